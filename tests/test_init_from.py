"""Continued pretraining: ``poetx train --init-from HF_DIR`` / ``TrainConfig(init_from=...)``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from poetx.cli.main import main
from poetx.data.dataset import build_data
from poetx.data.tokenizer import train_tokenizer
from poetx.layers.poet_linear import POETLinear
from poetx.train.checkpoint import latest_checkpoint, read_tensors
from poetx.train.config import TrainConfig
from poetx.train.evaluate import evaluate
from poetx.train.metrics import read_metrics
from poetx.train.run_model import build_run_model

from .test_cli import write_corpus


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> dict[str, Path]:
    """A small pretrained-looking HF folder: Llama weights and its own tokenizer.json."""
    root = tmp_path_factory.mktemp("init-from")
    corpus = write_corpus(root / "corpus.txt", lines=1500)
    tok = train_tokenizer(corpus.read_text().splitlines(), 320)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True) + 3, hidden_size=48,
        intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128))
    dest = root / "hf"
    model.save_pretrained(dest)
    tok.save(str(dest / "tokenizer.json"))
    return {"dir": dest, "corpus": corpus, "cache": root / "cache"}


def test_config_defaults_to_keep_and_refuses_normalized(hf_dir):
    cfg = TrainConfig(init_from=str(hf_dir["dir"]))
    assert cfg.poet.init == "keep"
    with pytest.raises(ValueError, match="poet.init: must be 'keep' with init_from"):
        TrainConfig(init_from=str(hf_dir["dir"]), poet={"init": "normalized"})
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(init_from="")
    assert TrainConfig(init_from=str(hf_dir["dir"]), optimizer="adamw").init_from


def test_run_model_starts_as_the_checkpoint(hf_dir):
    cfg = TrainConfig(init_from=str(hf_dir["dir"]), poet={"block_size": 16})
    model = build_run_model(cfg, 300, torch.device("cpu"), torch.float32).eval()
    assert any(isinstance(m, POETLinear) for m in model.modules())
    ref = AutoModelForCausalLM.from_pretrained(hf_dir["dir"]).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="embeds only"):
        build_run_model(cfg, 10_000, torch.device("cpu"), torch.float32)


def test_cli_continued_pretraining_end_to_end(hf_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--init-from", str(hf_dir["dir"]), "--data", str(hf_dir["corpus"]),
            "--cache-dir", str(hf_dir["cache"]), "--seq-len", "32", "--batch-size", "2",
            "--steps", "4", "--merge-every", "2", "--block-size", "16", "--eval-every", "0",
            "--save-every", "2",
            "--eval-batches", "2", "--out", str(out), "--device", "cpu", "--no-progress",
            "--no-tensorboard"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["init_from"] == str(hf_dir["dir"]) and saved["poet"]["init"] == "keep"
    # The run tokenized with the checkpoint's tokenizer...
    assert (out / "tokenizer.json").read_text() == (hf_dir["dir"] / "tokenizer.json").read_text()
    # ...and its step-0 validation loss is the checkpoint's own on the same batches.
    data = build_data(str(hf_dir["corpus"]), 32, 2, 0, cache_dir=hf_dir["cache"],
                      tokenizer_path=hf_dir["dir"] / "tokenizer.json", max_val_batches=2)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir["dir"])
    expected = evaluate(ref, data.val, torch.device("cpu"), 2)["val_loss"]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[0]["step"] == 0
    assert evals[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[-1]["step"] == 4

    # Resumed from its step-2 checkpoint (after the first merge): the unbroken run's weights.
    split = tmp_path / "split"
    argv_split = [a if a != str(out) else str(split) for a in argv]
    assert main([*argv_split, "--resume", str(out / "checkpoints" / "step_00000002")]) == 0
    whole = read_tensors(latest_checkpoint(out / "checkpoints") / "model.safetensors")
    parts = read_tensors(latest_checkpoint(split / "checkpoints") / "model.safetensors")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)

    dest = tmp_path / "dense"
    assert main(["export", str(out), str(dest)]) == 0
    assert AutoModelForCausalLM.from_pretrained(dest) is not None

    missing = ["train", "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]
    assert main(missing) == 1
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
