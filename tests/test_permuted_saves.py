"""Layers that keep their input for backward as the forward permuted it (``permuted_saves``):
the same outputs and gradients as keeping the input as given, and what backward keeps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from poetx import POETConfig, POETLinear
from poetx.kernels.block_rotate_ref import gather_columns
from poetx.model.wrap import poet_layers
from poetx.ops.rotated_gemm import poet_linear, poet_linear_prebuilt
from poetx.ops.rotation_group import build_rotation_blocks
from tests.test_shared_inputs import D, _assert_same, _run, _towers

T = 9


def _layer(n: int, m: int, mode: str, seed: int = 0) -> POETLinear:
    torch.manual_seed(seed)
    layer = POETLinear(n, m, bias=False, config=POETConfig(block_size=8, mode=mode),
                       name="mlp.down_proj", dtype=torch.float64)
    with torch.no_grad():
        layer.theta_in.normal_(0, 0.1)
        layer.theta_out.normal_(0, 0.1)
    return layer


def _blocks(layer: POETLinear) -> list[torch.Tensor]:
    return [build_rotation_blocks([getattr(layer, f"theta_{side}")],
                                  getattr(layer, f"layout_{side}").block, 3,
                                  getattr(layer, f"layout_{side}").valid_last,
                                  torch.float64)[0].detach() for side in ("in", "out")]


def _call(layer: POETLinear, x: torch.Tensor, prebuilt: bool, save_permuted: bool,
          handles: list[torch.Tensor]) -> torch.Tensor:
    fast = layer.config.mode == "fast"
    if prebuilt:
        d_in, d_out = _blocks(layer)
        return poet_linear_prebuilt(x, layer.w0, None, 256, d_in, d_out, *handles,
                                    layer.index_in, layer.index_out, fast,
                                    save_permuted=save_permuted)
    return poet_linear(x, layer.w0, None, 256, layer.theta_in, layer.theta_out, layer.index_in,
                       layer.index_out, 8, 8, 3, fast, save_permuted)


@pytest.mark.parametrize("prebuilt", [False, True])
@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("n,m", [(24, 16), (20, 12)])  # 20 -> 24 and 12 -> 16: padded blocks
def test_saving_the_permuted_input_changes_no_value(prebuilt, mode, n, m):
    """Output, input gradient and skew (or block) gradients equal those of the op keeping
    ``x`` as given, in float64, for both op paths and modes, padded widths included."""
    layer = _layer(n, m, mode)
    weight = torch.randn(T, m, dtype=torch.float64)
    results = []
    for save_permuted in (False, True):
        x = torch.randn(T, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        handles = [torch.zeros(d.shape, dtype=torch.float64, requires_grad=True)
                   for d in _blocks(layer)]
        y = _call(layer, x, prebuilt, save_permuted, handles)
        wrt = [x, *handles] if prebuilt else [x, layer.theta_in, layer.theta_out]
        grads = torch.autograd.grad((y * weight).sum(), wrt)
        results.append([y.detach(), *grads])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("prebuilt", [False, True])
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_backward_keeps_the_permuted_copy_not_the_input(prebuilt, mode):
    """What autograd keeps: with ``save_permuted`` no tensor sharing ``x``'s memory, and a
    ``(T, padded n)`` tensor equal to ``x`` gathered by ``index_in``; without it, ``x``."""
    n, m = 20, 12
    layer = _layer(n, m, mode)
    for save_permuted in (False, True):
        x = torch.randn(T, n, dtype=torch.float64, requires_grad=True)
        handles = [torch.zeros(d.shape, dtype=torch.float64, requires_grad=True)
                   for d in _blocks(layer)]
        kept: list[torch.Tensor] = []

        def pack(t, kept=kept):
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _call(layer, x, prebuilt, save_permuted, handles)
        shares_x = [t for t in kept if t.untyped_storage().data_ptr()
                    == x.untyped_storage().data_ptr()]
        permuted = gather_columns(x.detach(), layer.index_in, layer.layout_in.padded_dim)
        copies = [t for t in kept if t.shape == permuted.shape and torch.equal(t, permuted)]
        if save_permuted:
            assert not shares_x and len(copies) == 1
        else:
            assert shares_x and not copies


def test_which_layers_save_their_input_permuted():
    def saves(name: str, mode: str) -> bool:
        return POETLinear(16, 16, bias=False, config=POETConfig(block_size=8,
                                                                  permuted_saves=mode),
                          name=name).saves_permuted_input

    assert saves("model.layers.0.mlp.down_proj", "auto")
    assert not saves("model.layers.0.mlp.up_proj", "auto")
    assert not saves("model.layers.0.self_attn.o_proj", "auto")
    assert not saves("model.layers.0.mlp.down_proj", "off")
    assert saves("model.layers.0.self_attn.o_proj", "all")
    assert saves("model.layers.0.mlp.up_proj", "all")
    with pytest.raises(ValueError, match="permuted_saves"):
        POETConfig(permuted_saves="every")


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("checkpointed", ["", "call-plain", "forward-reentrant"])
@pytest.mark.parametrize("shared", ["off", "on"])
def test_a_model_whose_down_projections_save_permuted_inputs_equals_one_that_does_not(
        mode, checkpointed, shared):
    """Two decoder-like blocks whose MLP down projections keep their inputs permuted, beside
    q/k/v and gate/up fanned out or not, against the same model keeping every input as
    given: same outputs and gradients, also checkpointed, over the learning forward and the
    next."""
    ref, other = _towers(mode, checkpointed, shared=shared)
    for _, layer in poet_layers(ref):
        layer.config = replace(layer.config, permuted_saves="off")
    downs = []
    for name, layer in poet_layers(other):
        if name.endswith(".down"):
            # the permutations were drawn from the old name; a new one only marks the layer
            layer.layer_name += "_proj"
            downs.append(layer)
    assert len(downs) == 2 and all(layer.saves_permuted_input for layer in downs)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    for _ in range(2):
        _assert_same(_run(other, x), _run(ref, x))


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("checkpointed", ["", "call-plain"])
@pytest.mark.parametrize("shared", ["off", "on"])
def test_a_model_whose_layers_all_save_permuted_inputs_equals_one_that_does_not(
        mode, checkpointed, shared):
    """``permuted_saves="all"``: every layer keeps its input permuted (the fanned-out q/k/v
    and gate/up their copies): same outputs and gradients as keeping every input as given,
    over the learning forward and the next."""
    ref, other = _towers(mode, checkpointed, shared=shared)
    for _, layer in poet_layers(ref):
        layer.config = replace(layer.config, permuted_saves="off")
    for _, layer in poet_layers(other):
        layer.config = replace(layer.config, permuted_saves="all")
        assert layer.saves_permuted_input
    x = torch.randn(2, 3, D, dtype=torch.float64)
    for _ in range(2):
        _assert_same(_run(other, x), _run(ref, x))


@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_fan_out_copies_kept_for_backward_give_the_same_gradients(mode):
    """The op keeping a ``fan_out`` copy it was given (``x_perm`` with ``save_permuted``):
    three layers on one input, against the same layers keeping the shared input."""
    from poetx.ops.fan_out import fan_out

    layers = [_layer(20, m, mode, seed=i) for i, m in enumerate((20, 12, 12))]
    blocks = [_blocks(layer) for layer in layers]
    weights = [torch.randn(T, layer.out_features, dtype=torch.float64) for layer in layers]
    results = []
    for save_permuted in (False, True):
        x = torch.randn(T, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        x.requires_grad_(True)
        copies = fan_out(x, torch.stack([layer.index_in for layer in layers]),
                         layers[0].layout_in.padded_dim)
        handles = [torch.zeros(d.shape, dtype=torch.float64, requires_grad=True)
                   for pair in blocks for d in pair]
        ys = [poet_linear_prebuilt(x, layer.w0, None, 256, *pair, *handles[2 * i:2 * i + 2],
                                   layer.index_in, layer.index_out, mode == "fast", copy,
                                   save_permuted)
              for i, (layer, pair, copy) in enumerate(zip(layers, blocks, copies, strict=True))]
        loss = sum((y * w).sum() for y, w in zip(ys, weights, strict=True))
        results.append([*(y.detach() for y in ys), *torch.autograd.grad(loss, [x, *handles])])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prebuilt", [False, True])
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_saving_the_permuted_input_on_cuda_is_the_same(prebuilt, mode):
    """On the Triton path the op gathers with the same permutation kernel whether it keeps
    the copy or not: identical bits in bf16 for the output and the input gradient. The Grams
    read the same values but, from the contiguous copy, may take the TMA kernel where the
    indexed input took the gathering one (other tiles, another order of the float32 token
    sum; split sums add atomically in any order anyway). So the two block gradients are two
    computations of one value, each to the Gram kernels' tested accuracy against float64
    (``test_gram_gpu``: 1e-5 relative in bf16), and agree within twice that. The skew
    gradients pass through the Cayley-Neumann backward, whose tf32 / bf16 products round the
    Grams (``test_cayley_gpu``: 2e-3 against float64), so a last-bit difference in a Gram can
    move them by a rounding step of those products: they agree within twice 2e-3. A wrong
    frame or a stale saved buffer would be off by O(1)."""
    n, m = 1000, 768  # 1000 -> 1024: a padded last block
    torch.manual_seed(0)
    layer = POETLinear(n, m, bias=False, config=POETConfig(block_size=256, mode=mode),
                       name="mlp.down_proj", dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.theta_in.normal_(0, 0.02)
        layer.theta_out.normal_(0, 0.02)
    weight = torch.randn(512, m, device="cuda", dtype=torch.bfloat16)
    blocks = [build_rotation_blocks([getattr(layer, f"theta_{side}")],
                                    getattr(layer, f"layout_{side}").block, 3,
                                    getattr(layer, f"layout_{side}").valid_last,
                                    torch.bfloat16)[0].detach() for side in ("in", "out")]
    results = []
    for save_permuted in (False, True):
        x = torch.randn(512, n, device="cuda", dtype=torch.bfloat16,
                        generator=torch.Generator("cuda").manual_seed(1)).requires_grad_(True)
        handles = [torch.zeros(d.shape, device="cuda", requires_grad=True) for d in blocks]
        if prebuilt:
            y = poet_linear_prebuilt(x, layer.w0, None, 256, *blocks, *handles, layer.index_in,
                                     layer.index_out, mode == "fast",
                                     save_permuted=save_permuted)
            wrt = [x, *handles]
        else:
            y = poet_linear(x, layer.w0, None, 256, layer.theta_in, layer.theta_out,
                            layer.index_in, layer.index_out, 256, 256, 3, mode == "fast",
                            save_permuted)
            wrt = [x, layer.theta_in, layer.theta_out]
        results.append([y.detach(), *torch.autograd.grad((y.float() * weight.float()).sum(),
                                                         wrt)])
    (y1, gx1, *rest1), (y0, gx0, *rest0) = results[1], results[0]
    assert torch.equal(y1, y0) and torch.equal(gx1, gx0)
    tol = 2 * 1e-5 if prebuilt else 2 * 2e-3
    for got, want in zip(rest1, rest0, strict=True):
        assert ((got.double() - want.double()).norm() / want.double().norm()).item() < tol
