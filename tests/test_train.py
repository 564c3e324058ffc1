"""Training loop, config and schedule: tiny preset on CPU, a synthetic corpus, a few steps."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

import poetx.train.run_dir as run_dir_mod
import poetx.train.trainer as trainer_mod
from poetx.model.llama import PRESETS, build_model, llama_config
from poetx.train.checkpoint import list_checkpoints, verify_checkpoint
from poetx.train.config import TrainConfig, build_config, resume_config
from poetx.train.loop import NonFiniteError, TrainError, TrainInterrupted, train
from poetx.train.metrics import read_metrics
from poetx.train.run_model import build_run_model, grad_checkpointing_on
from poetx.train.schedule import WarmupCosine

WORDS = {
    "s": ["the king", "a queen", "my lord", "the fool", "a soldier", "the knight", "her brother",
          "his mother"],
    "v": ["loves", "hates", "sees", "follows", "betrays", "serves", "fears", "praises"],
    "o": ["the crown", "a sword", "the castle", "his horse", "the letter", "her ring", "the sea",
          "the night"],
    "a": ["today", "at dawn", "in silence", "with joy", "in anger", "by the river", "for ever",
          "once more"],
}


def write_corpus(path: Path, lines: int = 4000, seed: int = 0) -> Path:
    """A small, very learnable text: random sentences of a tiny grammar."""
    r = random.Random(seed)
    text = "\n".join(
        f"{r.choice(WORDS['s']).capitalize()} {r.choice(WORDS['v'])} {r.choice(WORDS['o'])} "
        f"{r.choice(WORDS['a'])}."
        for _ in range(lines)
    )
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"data": str(write_corpus(root / "corpus.txt")), "cache_dir": str(root / "cache")}


def small(corpus: dict[str, str], out: Path, **kw) -> TrainConfig:
    settings = dict(corpus, vocab_size=512, seq_len=64, batch_size=4, steps=6, eval_every=3,
                    save_every=3, eval_batches=2, keep_last=10, progress=False,
                    tensorboard=False, out=str(out))
    settings.update(kw)
    return TrainConfig(**settings)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["type"] == "train"]


# model presets ----------------------------------------------------------------------------------
def test_presets_follow_the_research_shapes():
    c = llama_config("llama-8b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (32, 8, 128256)
    c = llama_config("llama-60m", vocab_size=1000)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size) == (
        512, 1376, 8, 1000)
    assert llama_config("llama-13b").hidden_size == 5120
    for name in ("tiny", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-3b",
                 "llama-8b", "llama-13b", "llama-30b"):
        assert name in PRESETS
    # tiny's MLP width is not a multiple of its block size: the padded last block is exercised
    tiny = TrainConfig()
    assert PRESETS["tiny"].intermediate % tiny.poet.block_size != 0
    with pytest.raises(ValueError, match="preset"):
        llama_config("llama-2t")


def test_llama_30b_preset_has_the_published_parameter_count():
    """LLaMA-1 "33B": 32.5 B parameters (Touvron et al. 2023, table 2), counted on the meta
    device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config("llama-30b"))
    assert 32.4e9 < sum(p.numel() for p in model.parameters()) < 32.6e9


def test_build_model_dtype_and_wrap_keeps_skew_float32():
    model = build_model("tiny", 300, torch.bfloat16, "cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = build_run_model(TrainConfig(), 300, torch.device("cpu"), torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.theta_in.dtype == torch.float32 and layer.theta_out.dtype == torch.float32
    assert layer.w0.dtype == torch.bfloat16
    assert build_model("tiny", 300).lm_head.weight.dtype == torch.float32  # CPU default


# config -----------------------------------------------------------------------------------------
def test_config_defaults_follow_optimizer_and_preset():
    p = TrainConfig(preset="llama-60m")
    assert (p.lr, p.poet_lr, p.warmup_steps, p.max_grad_norm) == (1e-2, 1e-3, 0, 0.1)
    assert (p.poet.block_size, p.poet.merge_every, p.weight_decay) == (256, 200, 0.0)
    a = TrainConfig(preset="llama-60m", optimizer="adamw", steps=1000)
    assert (a.lr, a.warmup_steps, a.max_grad_norm) == (1e-3, 100, 1.0)
    assert TrainConfig(preset="llama-8b").poet.block_size == 512
    assert TrainConfig().out == "runs/tiny-poetx"


def test_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\nsteps = 50\nlr = 0.002\n[poet]\nblock_size = 32\n'
                    'merge_every = 7\n')
    cfg = build_config(toml, {"steps": 9, "poet": {"merge_every": 3}})
    assert (cfg.steps, cfg.lr, cfg.poet.block_size, cfg.poet.merge_every) == (9, 0.002, 32, 3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("settings,field", [
    ({"lr": -1.0}, "lr"),
    ({"steps": 0}, "steps"),
    ({"batch_size": "8"}, "batch_size"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"device": "tpu"}, "device"),
    ({"warmup_steps": 20, "steps": 10}, "warmup_steps"),
    ({"poet": {"block_size": 1}}, "block_size"),
    ({"lerning_rate": 1.0}, "lerning_rate"),
])
def test_config_errors_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(settings)


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(ValueError, match="bad.toml"):
        build_config(bad, {})
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        build_config(tmp_path / "nope.toml", {})


def test_resume_refuses_to_change_the_model():
    saved = TrainConfig(steps=10).to_dict()
    assert resume_config(saved, {"steps": 20}).steps == 20
    with pytest.raises(ValueError, match="seq_len"):
        resume_config(saved, {"seq_len": 32})
    with pytest.raises(ValueError, match="block_size"):
        resume_config(saved, {"poet": {"block_size": 16}})


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.505)
    assert s(110) == pytest.approx(0.01) and s(500) == pytest.approx(0.01)
    assert WarmupCosine(0, 100, 0.01)(0) == 1.0


# training ---------------------------------------------------------------------------------------
def test_training_lowers_loss_and_writes_the_run_dir(corpus, tmp_path):
    out = tmp_path / "run"
    result = train(small(corpus, out, steps=40, batch_size=8, eval_every=20, save_every=20,
                         tensorboard=True, poet={"merge_every": 15}))
    records = read_metrics(out)
    train_recs = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_recs] == list(range(1, 41))
    for key in ("loss", "lr", "tokens_per_s", "peak_mem_gib", "grad_norm", "poet_lr", "q_norm_max"):
        assert all(isinstance(r[key], float) for r in train_recs), key
    assert sum(r["merged"] for r in train_recs) == 2  # steps 15 and 30
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert all(math.isclose(e["val_ppl"], math.exp(e["val_loss"])) for e in evals)
    first = sum(r["loss"] for r in train_recs[:5]) / 5
    last = sum(r["loss"] for r in train_recs[-5:]) / 5
    assert last < first - 2.0, (first, last)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    assert result.last_eval["val_ppl"] == evals[-1]["val_ppl"]
    assert json.loads((out / "config.json").read_text())["poet"]["merge_every"] == 15
    assert (out / "tokenizer.json").is_file()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [20, 40]
    assert any((out / "tensorboard").iterdir())


def test_both_optimizers_run_through_the_same_loop(corpus, tmp_path):
    runs = {}
    for opt in ("poetx", "adamw"):
        out = tmp_path / opt
        train(small(corpus, out, optimizer=opt, steps=4, eval_every=2, save_every=0))
        runs[opt] = read_metrics(out)
    keys = {opt: {k for r in recs if r["type"] == "train" for k in r} for opt, recs in runs.items()}
    assert keys["adamw"] < keys["poetx"]  # poetx adds poet_lr, merged and q_norm_max only
    assert keys["poetx"] - keys["adamw"] == {"poet_lr", "merged", "q_norm_max"}
    for recs in runs.values():
        assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 2, 4]
    start = {opt: next(r for r in recs if r.get("event") == "start")
             for opt, recs in runs.items()}
    assert start["poetx"]["trainable"] < start["adamw"]["trainable"]
    assert start["poetx"]["parameters"] != start["adamw"]["parameters"]


@pytest.mark.parametrize("optimizer", ["poetx", "adamw", "poetx-sharedmlp", "poetx-fusedmlp"])
def test_resume_matches_an_unbroken_run_bitwise(corpus, tmp_path, optimizer, capsys):
    kw = {"optimizer": optimizer, "poet": {"merge_every": 2}}
    if optimizer == "poetx-sharedmlp":  # the MLPs' shared permutations, redrawn at merges
        kw = {"optimizer": "poetx", "poet": {"merge_every": 2, "mlp_permutations": "shared"}}
    if optimizer == "poetx-fusedmlp":  # the frame maps follow merges and the loaded checkpoint
        kw = {"optimizer": "poetx", "poet": {"merge_every": 2, "mlp_frames": "fused"}}
    train(small(corpus, tmp_path / "a", **kw))
    b = tmp_path / "b"
    train(small(corpus, b, **kw))
    # Forget everything after step 3, as if the run had died there; resume from step 3.
    shutil.rmtree(b / "checkpoints" / "step_00000006")
    cfg, ckpt = run_dir_mod.config_from_sources(None, {"out": str(b)}, resume=True)
    assert ckpt.name == "step_00000003"
    capsys.readouterr()
    train(cfg, ckpt)
    assert "warning" not in capsys.readouterr().out  # same data stream as before
    assert train_losses(b) == train_losses(tmp_path / "a")
    assert len(train_losses(b)) == 6
    evals = [r["step"] for r in read_metrics(b) if r["type"] == "eval"]
    assert evals == [0, 3, 6]


def test_fused_mlp_frames_train_exactly_as_the_unfused_model(corpus, tmp_path):
    """Same permutations, same values: the losses of a run with fused MLP frames equal those of
    the plain run bitwise, across merges (every 2 steps)."""
    plain = tmp_path / "plain"
    fused = tmp_path / "fused"
    train(small(corpus, plain, poet={"merge_every": 2}))
    train(small(corpus, fused, poet={"merge_every": 2, "mlp_frames": "fused"}))
    assert train_losses(fused) == train_losses(plain)


def test_ctrl_c_saves_and_resume_continues_bitwise(corpus, tmp_path, monkeypatch):
    kw = {"steps": 6, "save_every": 0, "eval_every": 0, "poet": {"merge_every": 2}}
    train(small(corpus, tmp_path / "a", **kw))
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def interrupt_at_step_six(model, batch):
        # Evaluation goes through poetx.train.loss directly: only training steps count here.
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # inside step 6's forward: nothing of step 6 applied yet
        return real(model, batch)

    monkeypatch.setattr(trainer_mod, "compute_loss", interrupt_at_step_six)
    b = tmp_path / "b"
    with pytest.raises(TrainInterrupted, match="after step 5") as info:
        train(small(corpus, b, **kw))
    assert info.value.checkpoint.name == "step_00000005"
    verify_checkpoint(info.value.checkpoint)
    monkeypatch.setattr(trainer_mod, "compute_loss", real)
    cfg, ckpt = run_dir_mod.config_from_sources(None, {"out": str(b)}, resume=True)
    train(cfg, ckpt)
    assert train_losses(b) == train_losses(tmp_path / "a")


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def nan_at_four(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(trainer_mod, "compute_loss", nan_at_four)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match="step 4") as info:
        train(small(corpus, out))
    assert info.value.step == 4
    assert "step_00000003" in str(info.value)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    verify_checkpoint(out / "checkpoints" / "step_00000003")
    assert not list((out / "checkpoints").glob("*.tmp-*"))

    calls["n"] = 0
    skip = tmp_path / "skip"
    train(small(corpus, skip, skip_nonfinite=True))
    recs = [r for r in read_metrics(skip) if r["type"] == "train"]
    assert [r["skipped"] for r in recs] == [False, False, False, True, False, False]
    assert recs[3]["loss"] is None  # NaN is written as null


def test_memory_options_pass_through(corpus, tmp_path):
    out = tmp_path / "mem"
    cfg = small(corpus, out, steps=2, eval_every=0, save_every=0, grad_checkpointing=True,
                poet={"w0_format": "int8", "mode": "mem"})
    train(cfg)
    model = build_run_model(cfg, 300, torch.device("cpu"), torch.float32)
    assert model.model.layers[0].self_attn.q_proj.w0.dtype == torch.int8
    assert grad_checkpointing_on(model)
    losses = train_losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_refuses_to_overwrite_a_run(corpus, tmp_path):
    out = tmp_path / "once"
    train(small(corpus, out, steps=1, eval_every=0, save_every=0))
    with pytest.raises(TrainError, match="already holds a run"):
        train(small(corpus, out, steps=1))


def test_missing_data_leaves_no_run_dir(corpus, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train(small(corpus, out, data=str(tmp_path / "nowhere.txt")))
    assert not out.exists()


def test_resuming_a_finished_run_does_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "done"
    train(small(corpus, out, steps=2, eval_every=0, save_every=0))
    before = (out / "metrics.jsonl").read_text()
    cfg, ckpt = run_dir_mod.config_from_sources(None, {"out": str(out)}, resume=True)
    result = train(cfg, ckpt)
    assert result.step == 2 and "nothing to do" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before
    cfg, ckpt = run_dir_mod.config_from_sources(None, {"out": str(out), "steps": 3}, resume=True)
    train(cfg, ckpt)
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"] == [1, 2, 3]


def test_grad_checkpointing_saves_the_rng_state_only_for_dropout():
    """Without dropout the recomputation draws nothing, so no RNG state is saved (restoring one
    inside a captured CUDA graph breaks the default generator outside it); with dropout the
    state is saved, so the recomputed masks equal the forward's."""
    from torch import nn

    from poetx.train.run_model import has_dropout

    model = build_model("tiny", vocab_size=64)
    assert not has_dropout(model)
    model.config.attention_dropout = 0.1
    assert has_dropout(model)
    assert has_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    assert not has_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))
