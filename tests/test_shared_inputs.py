"""Layers of a block that read the same input, fed by one fan-out
(``poetx.layers.shared_inputs``), against each layer gathering on its own."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import poetx
from poetx import POETConfig, POETLinear
from poetx.layers.rotation_groups import AccumulatedRotations, group_rotations
from poetx.layers.shared_inputs import sibling_runs
from poetx.model.wrap import merge_all_, poet_layers

D, F = 20, 36  # model and MLP widths at block size 8: both padded (24, 40)


class Block(nn.Module):
    """Attention-like q/k/v on one input, an MLP-like gate/up on another, their outputs
    through one more layer each (a Llama block's call pattern)."""

    def __init__(self, config: POETConfig, index: int, checkpointed: str = "",
                 dtype: torch.dtype = torch.float64, device: str = "cpu"):
        super().__init__()
        self.checkpointed = checkpointed

        def lin(n, m, name):
            return POETLinear(n, m, bias=False, config=config, name=f"b{index}.{name}",
                              dtype=dtype, device=device)

        self.q, self.k, self.v, self.o = lin(D, D, "q"), lin(D, 12, "k"), lin(D, 12, "v"), \
            lin(12, D, "o")
        self.gate, self.up, self.down = lin(D, F, "gate"), lin(D, F, "up"), lin(F, D, "down")

    def body(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + self.o(torch.tanh(k) * v) + 0.1 * q[..., :D]
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    def forward(self, x):
        if self.checkpointed.startswith("forward"):
            return checkpoint(self.body, x, use_reentrant=self.checkpointed.endswith("reentrant"))
        return self.body(x)


class Tower(nn.Module):
    def __init__(self, config: POETConfig, checkpointed: str = "", **where):
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(Block(config, i, checkpointed, **where) for i in range(2))

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointed.startswith("call"):
                x = checkpoint(block, x, use_reentrant=self.checkpointed.endswith("reentrant"))
            else:
                x = block(x)
        return x


def _towers(mode: str, checkpointed: str = "", shared: str = "on", **where):
    config = POETConfig(block_size=8, mode=mode, batch_rotations="on", shared_inputs="off")
    ref = Tower(config, checkpointed, **where)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    other = copy.deepcopy(ref)
    on = replace(config, shared_inputs=shared)
    for _, layer in poet_layers(other):
        layer.config = on
    group_rotations(ref)
    group_rotations(other)
    return ref, other


@pytest.fixture
def fan_outs(monkeypatch) -> list[int]:
    """The number of copies of every fan-out that runs."""
    import poetx.layers.shared_inputs as module

    sizes = []
    real = module.fan_out

    def counted(x, indices, positions):
        sizes.append(len(indices))
        return real(x, indices, positions)

    monkeypatch.setattr(module, "fan_out", counted)
    return sizes


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _assert_same(a, b):
    (y, gx, g), (y_ref, gx_ref, g_ref) = a, b
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-13)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("checkpointed", ["", "call-plain", "call-reentrant", "forward-plain",
                                          "forward-reentrant"])
def test_shared_inputs_equal_own_gathers(mode, checkpointed, fan_outs):
    """The first forward learns the runs (q/k/v, gate/up), later ones fan out: outputs, input
    gradients and skew gradients equal the per-layer gathers in float64, checkpointed too."""
    ref, shared = _towers(mode, checkpointed)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    _assert_same(_run(shared, x), _run(ref, x))
    # learning; a recomputation inside the hooks (in backward) already fans out
    recomputed = checkpointed.startswith("call")
    assert sorted(fan_outs) == sorted([3, 2] * 2 * recomputed)
    for block in shared.blocks:
        runs = {tuple(m.layer_name.split(".")[1] for m in run)
                for run in block._poetx_rotation_group.shared.runs.values()}
        assert runs == {("q", "k", "v"), ("gate", "up")}
    fan_outs.clear()
    _assert_same(_run(shared, x), _run(ref, x))
    # two blocks, two runs each, again in a recomputation inside the hooks
    assert sorted(fan_outs) == sorted([3, 2] * 2 * (1 + recomputed)), fan_outs


def test_shared_inputs_over_accumulation_and_merges(fan_outs):
    """Training steps with two micro-batches and merges in between: both stay equal."""
    ref, shared = _towers("fast")
    opts = [poetx.make_optimizer(m, lr=1e-2, poet_lr=1e-2) for m in (ref, shared)]
    xs = torch.randn(3, 2, 4, D, dtype=torch.float64)
    for step in range(3):
        for model, opt in zip((ref, shared), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            layers = [layer for _, layer in poet_layers(model)]
            with AccumulatedRotations(layers, 2) as rotations:
                for k in range(2):
                    rotations.micro_batch(k)
                    model(xs[step, k]).square().mean().backward()
            opt.step()
            if step == 1:
                merge_all_(model)
        for p, q in zip(ref.parameters(), shared.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)
    assert fan_outs  # the later steps fanned out


def test_sibling_runs():
    class L:
        def __init__(self, n, padded=8):
            self.in_features = n
            self.layout_in = type("Layout", (), {"padded_dim": padded})()
            self.compute_dtype = torch.float32

    a, b, c, d, e = L(8), L(8), L(8), L(4), L(8)
    # consecutive on one input: a run; alone, another width, or interrupted: none
    assert sibling_runs([(a, 1), (b, 1), (c, 1)]) == [(a, b, c)]
    assert sibling_runs([(a, 1), (d, 1), (b, 1)]) == []
    assert sibling_runs([(a, 1), (b, 2), (c, 1)]) == []
    assert sibling_runs([(a, 1), (b, 1), (c, 2), (e, 2)]) == [(a, b), (c, e)]
    assert sibling_runs([(a, 1), (a, 1)]) == []  # one layer twice is not a run
    assert sibling_runs([(a, 1), (b, 1), (a, 2), (c, 2)]) == [(a, b)]  # a is in one run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shared_inputs_on_cuda_match_own_gathers():
    """The Triton fan-out / fan-in (``shared_inputs="auto"`` on CUDA) against the layers'
    own gathers, float32: the copies are exact; the input gradient is summed in float32 once
    instead of added up by autograd, so it agrees to float32 rounding."""
    ref, shared = _towers("fast", shared="auto", dtype=torch.float32, device="cuda")
    x = torch.randn(4, 64, D, device="cuda")
    for _ in range(2):  # learn, then fan out
        got, want = _run(shared, x), _run(ref, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(block._poetx_rotation_group.shared.runs for block in shared.blocks)


def test_a_deep_copy_keeps_fanning_out(fan_outs):
    """The learned runs travel with a deep copy of the model, pointing at the copy's layers."""
    ref, shared = _towers("fast")
    x = torch.randn(2, 3, D, dtype=torch.float64)
    _run(shared, x)  # learn
    twin = copy.deepcopy(shared)
    fan_outs.clear()
    _assert_same(_run(twin, x), _run(ref, x))
    assert sorted(fan_outs) == [2, 2, 3, 3]
    for block in twin.blocks:
        runs = block._poetx_rotation_group.shared.runs
        assert all(any(m is layer for layer in block.modules()) for m in runs)
