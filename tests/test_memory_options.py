"""Issue 13's memory options: 8-bit states through checkpoints and resume, the optimizer step in
backward against the plain step, the planner's formula of each option, and ``poetx train``
refusing a run that cannot fit before it allocates anything."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from poetx.optim.clip import DeviceGradClip
from poetx.optim.in_backward import StepInBackward, embedding_and_head
from poetx.plan.memory import (
    GIB,
    LOWBIT_BLOCK,
    ModelShape,
    Setting,
    _lowbit_states,
    plan,
    predict,
)
from poetx.train.checkpoint.format import OPTIMIZER_FILE, CheckpointError
from poetx.train.checkpoint.optimizer_state import load_optimizer_state, optimizer_to_tensors
from tests.test_train import small, train_losses, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"data": str(write_corpus(root / "corpus.txt")), "cache_dir": str(root / "cache")}


needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="needs torchao")


# ---- 8-bit states in the checkpoint -----------------------------------------------------------

def _lowbit_setup(seed: int = 0):
    from poetx.optim.dense_update import LowBitAdamW

    torch.manual_seed(seed)
    rot = nn.Parameter(torch.randn(2 * 4096) * 1e-3)  # 8-bit eligible float32 "rotation"
    emb = nn.Parameter(torch.randn(64, 128).bfloat16())  # 8-bit + stochastic rounding
    norm = nn.Parameter(torch.ones(128, dtype=torch.bfloat16))  # Kahan
    groups = [{"params": [rot], "name": "poet", "lr": 1e-3},
              {"params": [emb], "name": "decay"},
              {"params": [norm], "name": "no_decay", "weight_decay": 0.0}]
    return (rot, emb, norm), LowBitAdamW(groups, lr=1e-2, rotation_8bit=True, fused=True)


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _step(params, opt, seed):
    for p, g in zip(params, _grads(params, seed), strict=True):
        p.grad = g
    torch.manual_seed(1000 + seed)  # stochastic rounding draws from the global generator
    opt.step()


@needs_torchao
def test_8bit_states_resume_exactly_through_the_checkpoint_format(tmp_path):
    params, opt = _lowbit_setup()
    for s in range(3):
        _step(params, opt, s)
    assert type(opt.lowbit.state[params[0]]["exp_avg"]).__name__ == "OptimState8bit"
    assert type(opt.lowbit.state[params[1]]["exp_avg_sq"]).__name__ == "OptimState8bit"
    tensors, meta = optimizer_to_tensors(opt)
    assert tensors["state.0.exp_avg.codes"].dtype == torch.uint8
    save_file(tensors, str(tmp_path / OPTIMIZER_FILE))

    params2, opt2 = _lowbit_setup(seed=7)  # other values: everything must come from the file
    with torch.no_grad():
        for a, b in zip(params2, params, strict=True):
            a.copy_(b)
    load_optimizer_state(tmp_path, opt2, {"optimizer": meta})
    for s in range(3, 6):
        _step(params, opt, s)
        _step(params2, opt2, s)
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(params[:2], params2[:2], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = opt.lowbit.state[p][key], opt2.lowbit.state[q][key]
            assert torch.equal(x.codes, y.codes) and torch.equal(x.scale, y.scale)
    assert torch.equal(opt.state[params[2]]["compensation"], opt2.state[params2[2]]["compensation"])


@needs_torchao
@pytest.mark.parametrize("damage,message", [
    ("drop-codes", "lacks its 'codes'"),
    ("drop-scale", "lacks its 'scale'"),
    ("bad-codes", "corrupt 8-bit state"),
    ("plain-for-8bit", "shape"),
])
def test_missing_or_corrupt_8bit_state_is_refused_naming_it(tmp_path, damage, message):
    params, opt = _lowbit_setup()
    _step(params, opt, 0)
    tensors, meta = optimizer_to_tensors(opt)
    key = "state.1.exp_avg"
    if damage == "drop-codes":
        del tensors[f"{key}.codes"]
    elif damage == "drop-scale":
        del tensors[f"{key}.scale"]
    elif damage == "bad-codes":
        tensors[f"{key}.codes"] = tensors[f"{key}.codes"][:10].contiguous()
    else:  # a plain state of the wrong shape where the 8-bit one was
        for part in ("codes", "scale", "qmap"):
            del tensors[f"{key}.{part}"]
        del meta["values"]["1.exp_avg.signed"]
        tensors[key] = torch.zeros(3)
    save_file(tensors, str(tmp_path / OPTIMIZER_FILE))
    _, fresh = _lowbit_setup()
    with pytest.raises(CheckpointError) as info:
        load_optimizer_state(tmp_path, fresh, {"optimizer": meta})
    text = str(info.value)
    assert message in text and ("parameter 1" in text or "'state.1.exp_avg'" in text)
    assert OPTIMIZER_FILE in str(info.value)


@needs_torchao
def test_8bit_step_in_slices_equals_the_whole_tensor_step(monkeypatch):
    from poetx.optim import dense_update
    from poetx.optim.dense_update import LowBitAdamW

    def run(chunk):
        monkeypatch.setattr(dense_update, "LOWBIT_CHUNK", chunk)
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(64 * 256))
        opt = LowBitAdamW([{"params": [p], "name": "poet"}], lr=1e-2, rotation_8bit=True)
        for i in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
            opt.step()
        state = opt.lowbit.state[p]
        return p.detach().clone(), state["exp_avg"].codes.clone(), state["exp_avg_sq"].scale

    whole, sliced = run(1 << 24), run(256 * 5)  # 13 slices, the last one shorter
    for a, b in zip(whole, sliced, strict=True):
        assert torch.equal(a, b)
    assert dense_update.LOWBIT_CHUNK == 256 * 5
    from poetx.plan import memory

    assert memory.LOWBIT_CHUNK == 1 << 24  # the planner's copy of the constant (default)


@needs_torchao
def test_merge_restart_reaches_the_8bit_rotation_states():
    from poetx.optim.state import reset_state_, rewarm_state_

    params, opt = _lowbit_setup()
    for s in range(2):
        _step(params, opt, s)
    rot = params[0]
    state = opt.lowbit.state[rot]
    mean_v = state["exp_avg_sq"].dequantize().mean()
    assert rewarm_state_(opt, [rot]) == 1
    assert torch.count_nonzero(state["exp_avg"].dequantize()) == 0
    v = state["exp_avg_sq"].dequantize()
    torch.testing.assert_close(v, torch.full_like(v, float(mean_v)), rtol=0.02, atol=0)
    assert float(state["step"]) == 2
    assert reset_state_(opt, [rot]) == 1
    assert torch.count_nonzero(state["exp_avg_sq"].dequantize()) == 0
    assert float(state["step"]) == 0


@needs_torchao
def test_8bit_run_resumes_bitwise_through_poetx_train(tmp_path, corpus, monkeypatch):
    """A bf16 CPU run with every memory option: killed after step 3, resumed, it gives the
    losses of the unbroken run (8-bit states, Kahan buffers, stochastic rounding's RNG)."""
    from poetx.optim import dense_update
    from poetx.train import run_dir as run_dir_mod
    from poetx.train.loop import train

    # tiny's tensors are not multiples of 256 values: quantize in blocks of 16 so that the
    # embedding and the larger rotation tensors get 8-bit states
    monkeypatch.setattr(dense_update, "LOWBIT_BLOCK_SIZE", 16)
    kw = {"dtype": "bfloat16", "dense_optimizer": "adamw8bit", "rotation_states": "8bit",
          "step_in_backward": True, "eval_every": 0, "poet": {"merge_every": 2, "block_size": 32}}
    train(small(corpus, tmp_path / "a", **kw))
    b = tmp_path / "b"
    train(small(corpus, b, **kw))
    shutil.rmtree(b / "checkpoints" / "step_00000006")
    cfg, ckpt = run_dir_mod.config_from_sources(None, {"out": str(b)}, resume=True)
    train(cfg, ckpt)
    assert train_losses(b) == train_losses(tmp_path / "a")
    saved = load_file(str(b / "checkpoints" / "step_00000006" / OPTIMIZER_FILE))
    codes = [k for k in saved if k.endswith(".codes")]
    assert len(codes) >= 4 and all(saved[k].dtype == torch.uint8 for k in codes)
    # the optimizer layout cannot change on resume
    with pytest.raises(ValueError, match="dense_optimizer: cannot change on --resume"):
        run_dir_mod.config_from_sources(None, {"out": str(b), "dense_optimizer": "adamw"},
                                        resume=True)


# ---- optimizer step in backward ---------------------------------------------------------------

class _TinyLM(nn.Module):
    """Embedding -> tanh(linear) -> head: two hooked parameters and a dense middle."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _loss(model, ids):
    logits = model(ids[:-1])
    return nn.functional.cross_entropy(logits, ids[1:])


def _clip_per_tensor_reference(model, hooked, max_norm):
    """Gradients as the in-backward semantics define them: each hooked tensor clipped on its
    own, the rest clipped by their joint norm."""
    eps = 1e-6
    rest = [p for p in model.parameters() if all(p is not h for h in hooked)]
    for group in [[h] for h in hooked] + [rest]:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in group]))
        factor = max(1.0, float((norm + eps) / max_norm))
        for p in group:
            p.grad.div_(factor)


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_step_in_backward_equals_the_plain_step_in_float64(max_norm):
    torch.manual_seed(0)
    ref = _TinyLM().double()
    model = _TinyLM().double()
    model.load_state_dict(ref.state_dict())
    kw = {"lr": 1e-2, "weight_decay": 0.1, "fused": True}
    opt_ref = torch.optim.AdamW(ref.parameters(), **kw)
    opt = torch.optim.AdamW(model.parameters(), **kw)
    clip = DeviceGradClip(opt, model.parameters(), max_norm)
    hooked = embedding_and_head(model)
    assert [id(p) for p in hooked] == [id(model.embed.weight), id(model.head.weight)]
    stepper = StepInBackward(opt, hooked, clip.max_norm)
    for step in range(4):
        ids = torch.randint(0, 11, (9,), generator=torch.Generator().manual_seed(step))
        opt_ref.zero_grad(set_to_none=True)
        _loss(ref, ids).backward()
        squares = sum(float(p.grad.norm() ** 2) for p in ref.parameters())
        if max_norm > 0:
            _clip_per_tensor_reference(ref, [ref.embed.weight, ref.head.weight], max_norm)
        opt_ref.step()

        opt.zero_grad(set_to_none=True)
        loss = _loss(model, ids)
        stepper.begin(loss)
        loss.backward()
        assert model.embed.weight.grad is None and model.head.weight.grad is None  # freed
        norm = clip(stepper.sq_norm)
        opt.step()
        # the reported norm and the clipping factors are float32 device tensors (as
        # DeviceGradClip's): float32 rounding where clipping acts, float64 exactness where not
        torch.testing.assert_close(float(norm) ** 2, squares, rtol=1e-6, atol=0)
        tol = {"rtol": 1e-12, "atol": 1e-14} if max_norm == 0 else {"rtol": 1e-6, "atol": 1e-9}
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, **tol)
    assert all(int(opt.state[p]["step"]) == 4 for p in model.parameters())


def test_step_in_backward_skips_on_a_nonfinite_loss_and_refuses_foreign_params():
    torch.manual_seed(0)
    model = _TinyLM().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clip = DeviceGradClip(opt, model.parameters(), 1.0)
    stepper = StepInBackward(opt, embedding_and_head(model), clip.max_norm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 11, (9,))
    loss = _loss(model, ids) * float("nan")
    stepper.begin(loss)
    loss.backward()
    assert torch.equal(model.embed.weight, before["embed.weight"])
    assert torch.equal(model.head.weight, before["head.weight"])
    assert not torch.isfinite(clip(stepper.sq_norm))
    with pytest.raises(ValueError, match="must be in the optimizer"):
        StepInBackward(opt, [nn.Parameter(torch.ones(2))], 1.0)
    stepper.remove()


def test_trainer_step_in_backward_runs_and_refuses_grad_accum(corpus, tmp_path):
    from poetx.train.errors import TrainError
    from poetx.train.loop import train

    out = tmp_path / "inbwd"
    train(small(corpus, out, steps=3, eval_every=0, save_every=0, step_in_backward=True))
    losses = train_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    with pytest.raises(TrainError, match="step_in_backward: needs one backward per step"):
        train(small(corpus, tmp_path / "accum", steps=1, step_in_backward=True, grad_accum=2,
                    batch_size=2))


# ---- the planner's formula of each option -----------------------------------------------------

SHAPE = ModelShape(hidden=512, intermediate=1376, layers=2, heads=8, kv_heads=8, vocab=1000)
LEAN = Setting(mode="mem", checkpointing=True)


def _bytes(p, part, moment="optimizer-step"):
    return p.moments[moment][part]


@needs_torchao
def test_lowbit_state_formula_is_torchaos_allocation():
    from torchao.optim import AdamW8bit

    for numel in (8192, 256 * 33, 4000, 4096 + 128):
        p = nn.Parameter(torch.zeros(numel))
        opt = AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones(numel)
        opt.step()
        got = 0
        for key in ("exp_avg", "exp_avg_sq"):
            v = opt.state[p][key]
            parts = [v.codes, v.scale, v.qmap] if hasattr(v, "codes") else [v]
            got += sum(t.numel() * t.element_size() for t in parts)
        assert _lowbit_states(lambda n: n, numel, 4) == got, numel
    assert LOWBIT_BLOCK == 256


def test_planner_terms_of_each_memory_option():
    e = 2
    base = predict(SHAPE, 64, 1, LEAN, cuda_allocator=False)
    v, d = SHAPE.vocab, SHAPE.hidden
    # step in backward: neither embedding nor head gradient at the optimizer step
    inb = predict(SHAPE, 64, 1, replace(LEAN, step_in_backward=True), cuda_allocator=False)
    assert (_bytes(base, "embed_head_norm_grads") - _bytes(inb, "embed_head_norm_grads")
            == 2 * v * d * e)
    # and the head's gradient is gone from the layer backward moments
    first = "layer-backward (first layer)"
    assert (_bytes(base, "embed_head_norm_grads", first)
            - _bytes(inb, "embed_head_norm_grads", first) == v * d * e)
    # 8-bit embedding/head states: 1 byte per state value + scales and code tables; norms keep
    # bf16 states and a bf16 Kahan buffer
    q = predict(SHAPE, 64, 1, replace(LEAN, dense_optimizer="adamw8bit"), cuda_allocator=False)
    norms = (2 * SHAPE.layers + 1) * d
    assert _bytes(q, "embed_head_norm_states") == (
        2 * 2 * (v * d + 4 * v * d // 256 + 1024) + 3 * norms * e)
    # 8-bit rotation states
    r = predict(SHAPE, 64, 1, replace(LEAN, dense_optimizer="adamw8bit", rotation_states="8bit"),
                cuda_allocator=False)
    theta = _bytes(base, "rotation_params") // 4  # float32 values
    assert _bytes(r, "rotation_states") < _bytes(base, "rotation_states") / 3
    assert _bytes(r, "rotation_states") >= 2 * theta
    # W0 residual on the device: W0's size again; on the host or off: nothing
    dev = predict(SHAPE, 64, 1, replace(LEAN, w0_residual="device"), cuda_allocator=False)
    assert _bytes(dev, "w0_residual") == _bytes(dev, "w0")
    assert _bytes(base, "w0_residual") == 0
    assert predict(SHAPE, 64, 1, replace(LEAN, w0_residual="device"), dtype_bytes=4,
                   cuda_allocator=False).moments["optimizer-step"]["w0_residual"] == 0
    # a captured step: the merge / evaluation run beside the pool that holds the step's peak
    g = predict(SHAPE, 64, 1, replace(LEAN, cuda_graphs=True), cuda_allocator=False)
    outside = g.moments["outside the graph (merge / eval)"]
    assert sum(outside.values()) > base.peak_bytes and g.peak_bytes == sum(outside.values())


def test_measured_rows_meet_the_issue_targets():
    """bench/results/memory_options.json (H200): the targets of issue 13, as measured."""
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parents[1]
                       / "bench/results/memory_options.json").read_text())
    peak = {(r["model"], r["seq_len"], r["method"]): r["peak_gib"] for r in rows}
    assert peak[("llama-8b", 1024, "mem-ckpt-lean")] <= 22
    assert peak[("llama-8b", 1024, "int8-lean")] <= 15
    assert peak[("llama-13b", 2048, "mem-ckpt-lean")] <= 32
    assert all(r["device"] and r["command"].startswith("python -m bench.model") for r in rows)


def test_planner_meets_the_issue_targets_only_with_the_options():
    def peak(preset, seq, **kw):
        return plan(preset, seq, 1, replace(LEAN, **kw)).peak_gib

    lean = {"dense_optimizer": "adamw8bit", "step_in_backward": True, "rotation_states": "8bit"}
    assert peak("llama-8b", 1024) > 22 and peak("llama-8b", 1024, **lean) <= 22
    assert peak("llama-8b", 1024, w0_format="int8", **lean) <= 15
    assert peak("llama-13b", 2048) > 32 and peak("llama-13b", 2048, **lean) <= 32


# ---- poetx train refuses what cannot fit ------------------------------------------------------

def test_train_refuses_an_oversized_run_before_allocating(tmp_path, capsys, monkeypatch):
    from poetx.cli.main import main
    from poetx.train import loop

    def no_model(*a, **k):  # the refusal must come before the model is built
        raise AssertionError("build_run_model called")

    monkeypatch.setattr(loop, "build_run_model", no_model)
    out = tmp_path / "big"
    code = main(["train", "--preset", "llama-8b", "--seq-len", "1024", "--batch-size", "1",
                 "--gpu-mem", "20", "--device", "cpu", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert "llama-8b" in err and "20.0 GiB" in err and "this fits:" in err
    assert "--step-in-backward" in err and "--no-fit-check" in err
    assert not out.exists()
    code = main(["train", "--preset", "llama-8b", "--seq-len", "1024", "--batch-size", "1",
                 "--gpu-mem", "1", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code != 0 and "no setting fits even at batch size 1" in capsys.readouterr().err


def test_no_fit_check_runs_anyway(corpus, tmp_path):
    from poetx.train.loop import train

    out = tmp_path / "nocheck"
    cfg = small(corpus, out, steps=1, eval_every=0, save_every=0, gpu_mem=0.001,
                fit_check=False)
    train(cfg)
    assert len(train_losses(out)) == 1
    from poetx.train.errors import TrainError

    with pytest.raises(TrainError, match="no setting fits"):
        train(small(corpus, tmp_path / "checked", steps=1, gpu_mem=0.001))
    assert GIB == 1 << 30
