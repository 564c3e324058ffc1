"""Batched rotation builds per decoder block (``poetx.layers.rotation_groups``) against the
per-layer path: same outputs, input gradients and skew-parameter gradients."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import poetx
from poetx import POETConfig, POETLinear
from poetx.layers.rotation_groups import (
    AccumulatedRotations,
    group_rotations,
    ungroup_rotations,
)
from poetx.model.wrap import merge_all_, poet_layers
from poetx.ops.rotation_group import build_rotation_group
from poetx.ortho.cayley import num_skew_params, rotation_delta_reference

# (in, out) of the layers of one block at block size 8: padded last blocks (12, 20), sides
# smaller than the block (5: its own block size), several sides with the same padding.
BLOCK_SHAPES = [(12, 20), (20, 5), (5, 16), (16, 12), (12, 12), (16, 16)]


class Block(nn.Module):
    def __init__(self, config: POETConfig, index: int, checkpointed: str = ""):
        super().__init__()
        self.checkpointed = checkpointed
        self.layers = nn.ModuleList(
            POETLinear(n, m, bias=False, config=config, name=f"b{index}.l{i}",
                       dtype=torch.float64)
            for i, (n, m) in enumerate(BLOCK_SHAPES))

    def body(self, x):
        a, b, c, d, e, f = self.layers
        h = torch.tanh(a(x))
        h = c(torch.tanh(b(h)))
        return x + d(torch.tanh(f(h))) + e(x)

    def forward(self, x):
        where, _, kind = self.checkpointed.partition("-")
        if where == "forward":  # inside the module's hooks (Hugging Face 5)
            return checkpoint(self.body, x, use_reentrant=kind == "reentrant")
        return self.body(x)


class Tower(nn.Module):
    """Two blocks in a ``ModuleList`` and a head. ``checkpointed``: activation checkpointing of
    each block, ``call-*`` around the block's call (its hooks run in the recomputation),
    ``forward-*`` inside its forward (they do not); ``*-reentrant`` or ``*-plain``."""

    def __init__(self, config: POETConfig, checkpointed: str = ""):
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(Block(config, i, checkpointed) for i in range(2))
        self.head = POETLinear(12, 3, config=config, name="head", dtype=torch.float64)

    def forward(self, x):
        where, _, kind = self.checkpointed.partition("-")
        for block in self.blocks:
            if where == "call":
                x = checkpoint(block, x, use_reentrant=kind == "reentrant")
            else:
                x = block(x)
        return self.head(x)


def _towers(terms, mode, checkpointed=""):
    config = POETConfig(block_size=8, neumann_terms=terms, mode=mode, batch_rotations="off")
    ref = Tower(config, checkpointed)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    batched = copy.deepcopy(ref)
    on = replace(config, batch_rotations="on")
    for _, layer in poet_layers(batched):
        layer.config = on
    assert group_rotations(batched) == 2 and group_rotations(batched) == 2  # idempotent
    return ref, batched


@pytest.fixture
def prebuilt_calls(monkeypatch) -> list[int]:
    """How often the prebuilt-blocks op runs (appended to by every call)."""
    import poetx.layers.poet_linear as module

    calls = []
    real = module.poet_linear_prebuilt

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "poet_linear_prebuilt", counted)
    return calls


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("terms", [3, 2, None])
@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("checkpointed", ["", "call-plain", "call-reentrant", "forward-plain",
                                          "forward-reentrant"])
def test_batched_build_equals_per_layer(terms, mode, checkpointed, prebuilt_calls):
    ref, batched = _towers(terms, mode, checkpointed)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    y_ref, gx_ref, g_ref = _run(ref, x)
    y, gx, g = _run(batched, x)
    # every block layer ran on prebuilt blocks (again in the recomputation), the head did not
    per_forward = 2 * len(BLOCK_SHAPES)
    assert len(prebuilt_calls) == per_forward * (2 if checkpointed else 1)
    assert all(block._poetx_rotation_group.blocks is None for block in batched.blocks) or \
        checkpointed.startswith("forward")  # a recomputation outside the hooks keeps them
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-13, atol=1e-13)
    assert g.keys() == g_ref.keys() and any(k.endswith("theta_in") for k in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


def test_batched_build_over_merges_and_optimizer_steps(prebuilt_calls):
    """Training steps with merges in between: both paths stay equal (the merge rewrites the
    same tensors the hooks read)."""
    ref, batched = _towers(3, "fast")
    opts = [poetx.make_optimizer(m, lr=1e-2, poet_lr=1e-2) for m in (ref, batched)]
    x = torch.randn(4, 12, dtype=torch.float64)
    for step in range(5):
        for model, opt in zip((ref, batched), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
            if step == 2:
                merge_all_(model)
        for (name, p), q in zip(ref.named_parameters(), batched.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13, msg=name)
    assert len(prebuilt_calls) == 5 * 2 * len(BLOCK_SHAPES)


def test_chunks_pack_consecutive_sides(monkeypatch):
    import poetx.ops.rotation_group as rg

    monkeypatch.setattr(rg, "CHUNK_BLOCKS", 96)
    sizes = [16, 16, 16, 4, 16, 4, 16, 16, 16, 56, 16, 56, 56, 16]  # Llama-8B, b = 256
    assert rg._chunks(sizes) == [(0, 7), (7, 10), (10, 12), (12, 14)]
    assert rg._chunks([200, 3]) == [(0, 1), (1, 2)] and rg._chunks([]) == []


def test_unused_layer_gets_no_gradient_and_no_grad_forward():
    ref, batched = _towers(3, "fast")
    block = batched.blocks[0]
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(batched(x), ref(x), rtol=1e-13, atol=1e-13)
    # members the block never calls (one batched with others, one alone): no gradient, as
    # on the per-layer path
    config = block.layers[0].config
    block.extra = nn.ModuleList([POETLinear(16, 16, config=config, dtype=torch.float64),
                                 POETLinear(12, 12, config=config, dtype=torch.float64)])
    batched(x).sum().backward()
    assert all(p.grad is None for p in block.extra.parameters())
    assert block.layers[0].theta_in.grad is not None
    ungroup_rotations(batched)
    assert group_rotations(nn.Sequential()) == 0
    assert not block._forward_pre_hooks and not block._forward_hooks
    assert all(layer.rotation_group is None for layer in block.layers)


def test_direct_calls_outside_the_group_take_the_per_layer_path(prebuilt_calls):
    """A layer called on its own (not inside its block's forward) builds its own blocks, also
    twice in a row without a parameter change in between."""
    ref, batched = _towers(3, "fast")
    x = torch.randn(3, 12, dtype=torch.float64)
    batched(x)  # the layers know their group now
    prebuilt_calls.clear()
    layer, ref_layer = batched.blocks[0].layers[0], ref.blocks[0].layers[0]
    for _ in range(2):
        layer(x).sum().backward()
        ref_layer(x).sum().backward()
    assert not prebuilt_calls
    torch.testing.assert_close(layer.theta_in.grad, ref_layer.theta_in.grad)


@pytest.mark.parametrize("sides", [[(3, 8, None), (2, 8, None), (1, 8, 5)],
                                   [(4, 6, None)], [(1, 4, 3)],
                                   [(2, 8, None), (5, 8, None), (1, 8, None), (2, 8, 3)]])
@pytest.mark.parametrize("chunk", [96, 3])
def test_group_build_blocks_match_reference(sides, chunk, monkeypatch):
    """The group's blocks equal the reference of each side, gradients through the handles equal
    autograd of the reference (float64); also split into calls of at most ``chunk`` blocks
    (a larger side alone), the padded side last."""
    import poetx.ops.rotation_group as rg

    monkeypatch.setattr(rg, "CHUNK_BLOCKS", chunk)
    thetas = [torch.randn(nb, num_skew_params(b), dtype=torch.float64, requires_grad=True)
              for nb, b, _ in sides]
    block = sides[0][1]
    blocks, handles = build_rotation_group(thetas, block, 3, sides[-1][2], torch.float64)
    weights = [torch.randn(h.shape, dtype=torch.float64) for h in handles]
    sum((h * w).sum() for h, w in zip(handles, weights, strict=True)).backward()
    for i, (theta, (_, b, vl)) in enumerate(zip(thetas, sides, strict=True)):
        t = theta.detach().clone().requires_grad_(True)
        ref = rotation_delta_reference(t, b, 3, vl if i == len(sides) - 1 else None)
        torch.testing.assert_close(blocks[i], ref.detach(), rtol=1e-13, atol=1e-14)
        (ref * weights[i]).sum().backward()
        torch.testing.assert_close(theta.grad, t.grad, rtol=1e-12, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_batched_build_equals_per_layer_on_gpu(mode):
    """bf16 on CUDA (Triton kernels): the batched build gives the per-layer numbers."""
    from transformers import LlamaForCausalLM

    from poetx.model.build import build_poet_model, rebuild_hf_rotary
    from poetx.model.llama import llama_config
    from poetx.model.lm_loss import causal_lm_loss

    runs = []
    for setting in ("off", "on"):
        torch.manual_seed(0)
        cfg = POETConfig(block_size=64, mode=mode, batch_rotations=setting)
        model = build_poet_model(lambda: LlamaForCausalLM(llama_config("tiny")), cfg, "cuda",
                                 torch.bfloat16, rebuild_buffers=rebuild_hf_rotary)
        with torch.no_grad():
            for _, layer in poet_layers(model):
                layer.theta_in.normal_(0, 0.01)
                layer.theta_out.normal_(0, 0.01)
        ids = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(3))
        loss = causal_lm_loss(model, ids.cuda())
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((float(loss.detach()), grads))
    (loss_off, g_off), (loss_on, g_on) = runs
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    for name, g in g_off.items():
        torch.testing.assert_close(g_on[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_group_build_at_decoder_block_size_on_gpu():
    """Llama-8B's 14 sides of one decoder block (320 blocks of 256: three chunks) built and
    differentiated together: the per-side kernels' numbers (same kernels, same blocks)."""
    from poetx.ops import backend

    sizes = [16, 16, 16, 4, 16, 4, 16, 16, 16, 56, 16, 56, 56, 16]
    thetas = [(0.01 * torch.randn(nb, num_skew_params(256), device="cuda")).requires_grad_(True)
              for nb in sizes]
    grads = [torch.randn(nb, 256, 256, device="cuda") for nb in sizes]
    blocks, handles = build_rotation_group(thetas, 256, 3, None, torch.bfloat16)
    torch.autograd.backward(handles, grads)
    for t, d, g in zip(thetas, blocks, grads, strict=True):
        ref = backend.rotation_delta(t.detach(), 256, 3, None, torch.bfloat16)
        torch.testing.assert_close(d, ref, rtol=0, atol=0)
        ref_grad = backend.rotation_delta_backward(t.detach(), g, 256, 3, None,
                                                   build_dtype=torch.bfloat16)
        torch.testing.assert_close(t.grad, ref_grad, rtol=1e-6, atol=1e-9)


def _micro_batches(model, xs, scoped: bool, last_runs_first_block_only: bool = False):
    """Forward and backward of every micro-batch in ``xs`` (gradients accumulate), inside
    :class:`AccumulatedRotations` when ``scoped``: ``(input gradients, parameter gradients)``."""
    layers = [layer for _, layer in poet_layers(model)]
    grads_x = []
    scope = AccumulatedRotations(layers, len(xs)) if scoped else contextlib.nullcontext()
    with scope:
        for k, x in enumerate(xs):
            if scoped:
                scope.micro_batch(k)
            x = x.clone().requires_grad_(True)
            last = k == len(xs) - 1
            y = model.blocks[0](x) if last and last_runs_first_block_only else model(x)
            (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
            grads_x.append(x.grad)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads_x, grads


@pytest.mark.parametrize("path", ["per-layer", "batched"])
@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("checkpointed", ["", "call-reentrant", "forward-plain"])
def test_accumulated_rotations_build_once_per_step(path, mode, checkpointed, built_blocks):
    """K micro-batches inside ``AccumulatedRotations``: every block is built once and
    differentiated once for the whole step (against K times, or more with recomputation,
    when rebuilt per micro-batch), and the input and parameter gradients are those of the
    rebuild-per-micro-batch path (float64)."""
    ref, batched = _towers(3, mode, checkpointed)
    model = ref if path == "per-layer" else batched
    rebuilt = copy.deepcopy(model)
    if path == "batched":
        group_rotations(rebuilt)
    blocks = sum(layer.layout_in.num_blocks + layer.layout_out.num_blocks
                 for _, layer in poet_layers(model))
    micro = 3
    xs = list(torch.randn(micro, 2, 12, dtype=torch.float64))
    gx_ref, g_ref = _micro_batches(rebuilt, xs, scoped=False)
    assert built_blocks["forward"] >= micro * blocks and built_blocks["backward"] == micro * blocks
    built_blocks.update(forward=0, backward=0)
    gx, g = _micro_batches(model, xs, scoped=True)
    assert built_blocks == {"forward": blocks, "backward": blocks}
    assert all(layer.step_rotations is None for _, layer in poet_layers(model))
    for a, b in zip(gx, gx_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert g.keys() == g_ref.keys() and any(k.endswith("theta_out") for k in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("path", ["per-layer", "batched"])
def test_accumulated_rotations_of_layers_the_last_micro_batch_skips(path, built_blocks):
    """Layers that ran in earlier micro-batches but not in the last get their gradients when
    the step's scope closes (a backward of their own), equal to the rebuilding path's."""
    ref, batched = _towers(3, "fast")
    model = ref if path == "per-layer" else batched
    rebuilt = copy.deepcopy(model)
    if path == "batched":
        group_rotations(rebuilt)
    xs = list(torch.randn(2, 2, 12, dtype=torch.float64))
    _, g_ref = _micro_batches(rebuilt, xs, scoped=False, last_runs_first_block_only=True)
    built_blocks.update(forward=0, backward=0)
    _, g = _micro_batches(model, xs, scoped=True, last_runs_first_block_only=True)
    blocks = sum(layer.layout_in.num_blocks + layer.layout_out.num_blocks
                 for _, layer in poet_layers(model))
    assert built_blocks == {"forward": blocks, "backward": blocks}
    assert g.keys() == g_ref.keys() and "head.theta_in" in g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


class TwiceBlock(Block):
    """A block that calls one of its layers twice (weights shared within the block)."""

    def body(self, x):
        a, b, c, d, e, f = self.layers
        h = torch.tanh(a(x))
        h = c(torch.tanh(b(h)))
        return x + d(torch.tanh(f(h))) + e(x) + e(torch.tanh(x))


@pytest.mark.parametrize("micro", [1, 2])
def test_a_layer_called_twice_in_a_block(micro):
    """Both calls add into the side's part of the gradient sink, and autograd sums the two
    tokens the ops hand back (zeros, ignored): the gradients of the per-layer path."""
    ref, batched = _towers(3, "fast")
    for tower in (ref, batched):
        for block in tower.blocks:
            block.__class__ = TwiceBlock
    xs = list(torch.randn(micro, 2, 12, dtype=torch.float64))
    gx_ref, g_ref = _micro_batches(ref, xs, scoped=False)
    gx, g = _micro_batches(batched, xs, scoped=micro > 1)
    for a, b in zip(gx, gx_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


def test_micro_batches_add_their_block_gradients_into_one_buffer_per_build():
    """Before the last micro-batch, each build's sides hold their summed block gradients in
    one buffer (no tensor per side, nothing reaches a parameter), also for a first layer
    whose input does not require grad; the step's gradients are the rebuilding path's."""
    ref, batched = _towers(3, "fast")
    rebuilt = copy.deepcopy(batched)
    xs = torch.randn(3, 2, 12, dtype=torch.float64)
    weights = torch.linspace(-1, 1, 3, dtype=torch.float64)
    for model, scoped in ((rebuilt, False), (batched, True)):
        layers = [layer for _, layer in poet_layers(model)]
        scope = AccumulatedRotations(layers, 3) if scoped else contextlib.nullcontext()
        with scope:
            for k in range(3):
                if scoped:
                    scope.micro_batch(k)
                (model(xs[k]) * weights).sum().backward()
                if scoped and k == 1:
                    builds = {id(b): b for b, _ in scope.builds.values()}.values()
                    for build in builds:
                        sink = build.carry.sink
                        assert sink.data is not None and all(sink.filled)
                        assert sink.data.shape[0] == sum(sink.sizes)
                        assert build.carry.root.grad is None
                    assert all(layer.theta_in.grad is None for layer in layers)
    g_ref = {n: p.grad for n, p in rebuilt.named_parameters() if p.grad is not None}
    g = {n: p.grad for n, p in batched.named_parameters() if p.grad is not None}
    assert g.keys() == g_ref.keys() and any(k.endswith("theta_in") for k in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-13, msg=name)


def test_a_blocks_gradient_sink_lives_only_through_its_backward(monkeypatch):
    """One step without accumulation: each build call of a decoder block gets one sink,
    allocated by the first Gram of its backward and released by the Cayley-Neumann
    backward."""
    import poetx.ops.rotation_group as rg

    sinks = []
    real = rg.GradientSink.__init__

    def recorded(self, *args, **kwargs):
        real(self, *args, **kwargs)
        sinks.append(self)

    monkeypatch.setattr(rg.GradientSink, "__init__", recorded)
    _, batched = _towers(3, "fast")
    y = batched(torch.randn(2, 12, dtype=torch.float64))
    from poetx.layers.rotation_groups import _calls

    calls = sum(len(_calls([m for _, m in poet_layers(block)])) for block in batched.blocks)
    assert len(sinks) == calls and all(s.data is None for s in sinks)  # one per build call
    y.sum().backward()
    assert all(s.data is None and not s.pending() for s in sinks)
    assert all(layer.theta_out.grad is not None for _, layer in poet_layers(batched.blocks))
