"""The README's three examples (plain loop, Trainer, accelerate), run as written on a tiny Llama.

Only sizes are shrunk for the CPU (each replacement must match the README text, so an edit of
the README that drops one fails here instead of silently testing something else).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import poetx

from .test_integrations import VOCAB, TokenDataset, tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"
SHRINK = {
    "block_size=256": "block_size=16",
    "merge_every=200": "merge_every=3",
    "max_steps=1000": "max_steps=7",
    "T_max=1000": "T_max=7",
    "save_steps=500": "save_steps=4",
    "clip_warmup_steps=20": "clip_warmup_steps=2",
    "batch_size=8": "batch_size=2",
}


def readme_example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    code = match.group(1)
    for old, new in SHRINK.items():
        code = code.replace(old, new)
    return code


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset = TokenDataset(14)
    batches = [{"input_ids": dataset.ids[i:i + 2], "labels": dataset.ids[i:i + 2]}
               for i in range(0, 14, 2)]
    return {"model": tiny_llama(), "batches": batches, "train_dataset": dataset}


def _check_dense(path: Path, model: torch.nn.Module) -> None:
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_plain_loop_example(namespace, tmp_path):
    exec(readme_example("plain"), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, poetx.POETAdamW) and optimizer.merges == 7 // 3
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert saved["poetx_merge_schedule"]["steps"] == 7


def test_trainer_example(namespace, tmp_path):
    exec(readme_example("trainer"), namespace)
    model = namespace["model"]
    assert int(model.model.layers[1].self_attn.o_proj.merge_count) == 7 // 3
    assert (tmp_path / "runs/hf/checkpoint-4/model.safetensors").is_file()
    _check_dense(tmp_path / "runs/hf/dense", model)


def test_accelerate_example(namespace, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    exec(readme_example("accelerate"), namespace)
    optimizer = namespace["optimizer"]  # AcceleratedOptimizer around POETAdamW
    assert optimizer.optimizer.merges == 7 // 3
    assert (tmp_path / "runs/acc/state").is_dir()
    _check_dense(tmp_path / "runs/acc/dense",
                 namespace["accelerator"].unwrap_model(namespace["model"]))


def test_shrinks_match_the_readme():
    examples = "".join(
        re.findall(r"<!-- example: \w+ -->\n```python\n(.*?)```", README.read_text(), re.S))
    assert [old for old in SHRINK if old not in examples] == []
