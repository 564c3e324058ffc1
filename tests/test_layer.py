"""POETLinear against independent float64 references."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from poetx import POETConfig, POETLinear
from tests.reference import effective_weight_dense

SHAPES = [  # (in, out, block): divisible, padded on one or both sides, block larger than a side
    (16, 24, 8),
    (20, 12, 8),
    (12, 20, 8),
    (7, 5, 4),
    (6, 10, 16),
]


def make_layer(n, m, b, terms=3, mode="fast", bias=True, scale=0.2):
    linear = nn.Linear(n, m, bias=bias, dtype=torch.float64)
    config = POETConfig(block_size=b, neumann_terms=terms, mode=mode, init="keep")
    layer = POETLinear.from_linear(linear, config, name="layer")
    with torch.no_grad():
        layer.theta_in.normal_(0, scale)
        layer.theta_out.normal_(0, scale)
    return layer, linear.weight.detach().clone()


@pytest.mark.parametrize("n,m,b", SHAPES)
@pytest.mark.parametrize("terms", [None, 1, 3])
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_output_equals_dense_reference(n, m, b, terms, mode):
    layer, w0 = make_layer(n, m, b, terms, mode)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    ref = x @ effective_weight_dense(layer, w0).T + layer.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        layer.effective_weight(torch.float64), effective_weight_dense(layer, w0)
    )


@pytest.mark.parametrize("n,m,b", SHAPES)
def test_exact_cayley_keeps_singular_values(n, m, b):
    layer, w0 = make_layer(n, m, b, terms=None, scale=0.5)
    sv = torch.linalg.svdvals(layer.effective_weight(torch.float64))
    torch.testing.assert_close(sv, torch.linalg.svdvals(w0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,m,b", [(16, 24, 8), (20, 12, 8)])
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_gradcheck(n, m, b, mode):
    layer, _ = make_layer(n, m, b, terms=2, mode=mode)
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    params = (layer.theta_in, layer.theta_out, layer.bias)

    def fn(x, theta_in, theta_out, bias):
        return torch.func.functional_call(
            layer, {"theta_in": theta_in, "theta_out": theta_out, "bias": bias}, (x,)
        )

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().requires_grad_() for p in params]))


def test_fast_and_mem_give_identical_gradients():
    grads = {}
    for mode in ("fast", "mem"):
        torch.manual_seed(7)
        layer, _ = make_layer(20, 36, 8, mode=mode)
        x = torch.randn(4, 9, 20, dtype=torch.float64, requires_grad=True)
        (layer(x) ** 2).sum().backward()
        grads[mode] = [x.grad, layer.theta_in.grad, layer.theta_out.grad, layer.bias.grad]
    for a, b in zip(grads["fast"], grads["mem"], strict=True):
        assert torch.equal(a, b)


def test_gradients_match_dense_reference():
    layer, w0 = make_layer(12, 20, 8, terms=3)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 20, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = effective_weight_dense(layer, w0).requires_grad_()
    ((x_ref @ w_ref.T + layer.bias.detach() - target) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_keep_init_preserves_function_and_normalized_init_has_unit_rows():
    linear = nn.Linear(40, 24, dtype=torch.float64)
    layer = POETLinear.from_linear(linear, POETConfig(block_size=16, init="keep"))
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x))
    fresh = POETLinear(40, 24, config=POETConfig(block_size=16), dtype=torch.float64)
    norms = fresh.effective_weight(torch.float64).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_w0_is_frozen_and_params_are_half_storage():
    layer = POETLinear(64, 48, config=POETConfig(block_size=16))
    assert not layer.w0.requires_grad
    assert layer.theta_in.shape == (4, 16 * 15 // 2)
    assert layer.theta_out.shape == (3, 16 * 15 // 2)
    x = torch.randn(2, 64)
    layer(x).sum().backward()
    assert layer.w0.grad is None and layer.theta_in.grad is not None


def test_bf16_close_to_float32():
    layer = POETLinear(64, 96, config=POETConfig(block_size=32))
    with torch.no_grad():
        layer.theta_in.normal_(0, 0.05)
        layer.theta_out.normal_(0, 0.05)
    x = torch.randn(8, 64)
    y32 = layer(x)
    layer16 = POETLinear(64, 96, config=POETConfig(block_size=32), dtype=torch.bfloat16)
    layer16.load_state_dict(layer.state_dict())
    assert layer16.theta_in.dtype == torch.float32  # rotations stay float32 in a bf16 layer
    y16 = layer16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 2e-2


def test_merge_keeps_function_and_resets():
    layer, _ = make_layer(20, 12, 8, terms=None)  # exact map: the merge folds what forward used
    x = torch.randn(4, 20, dtype=torch.float64)
    before = layer(x)
    perms = (layer.perm_in.clone(), layer.perm_out.clone())
    layer.merge_()
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)
    assert layer.theta_in.abs().sum() == 0 and layer.theta_out.abs().sum() == 0
    assert not torch.equal(layer.perm_in, perms[0]) and not torch.equal(layer.perm_out, perms[1])
    assert int(layer.merge_count) == 1


def test_state_dict_round_trip_through_safetensors():
    layer, _ = make_layer(20, 12, 8)
    layer.merge_()
    with torch.no_grad():
        layer.theta_in.normal_(0, 0.1)
    blob = save({k: v.contiguous() for k, v in layer.state_dict().items()})
    other = POETLinear(20, 12, config=layer.config, name="other", dtype=torch.float64)
    other.load_state_dict(load(blob))
    assert torch.equal(other.perm_in, layer.perm_in) and int(other.merge_count) == 1
    x = torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)  # plain torch serialization works as well


def _assert_inverses_attached(layer):
    from poetx.kernels.block_rotate_ref import attached_inverse

    for side in ("in", "out"):
        index = getattr(layer, f"index_{side}")
        dim = getattr(layer, f"layout_{side}").dim
        inverse = attached_inverse(index, dim)
        assert inverse is getattr(layer, f"inv_{side}"), side
        assert torch.equal(index[inverse.long()], torch.arange(dim)), side


def test_indices_carry_their_inverses_through_merges_loads_and_moves():
    """The scatters read a layer's ``inv_in`` / ``inv_out`` (attached to its indices) instead
    of inverting: after a merge redraws the permutations, a state is loaded, or the layer is
    converted, the attachments hold and invert the indices."""
    layer, _ = make_layer(20, 12, 8)
    _assert_inverses_attached(layer)
    layer.merge_()
    _assert_inverses_attached(layer)
    other = POETLinear(20, 12, config=layer.config, name="other", dtype=torch.float64)
    other.load_state_dict(layer.state_dict())
    _assert_inverses_attached(other)
    other.float()
    _assert_inverses_attached(other)
    import copy

    from poetx.kernels.block_rotate_ref import attached_inverse

    twin = copy.deepcopy(other)  # the copy's attribute names the original's storage
    assert attached_inverse(twin.index_out, 12) is None


def test_permutations_are_reproducible_from_seed_and_name():
    cfg = POETConfig(block_size=8, seed=3)
    a = POETLinear(32, 16, config=cfg, name="blocks.0.q")
    b = POETLinear(32, 16, config=cfg, name="blocks.0.q")
    c = POETLinear(32, 16, config=cfg, name="blocks.1.q")
    assert torch.equal(a.perm_in, b.perm_in) and torch.equal(a.w0, b.w0)
    assert not torch.equal(a.perm_in, c.perm_in)
    a.merge_()
    b.merge_()
    assert torch.equal(a.perm_in, b.perm_in)


@pytest.mark.parametrize("fmt,tol", [("int8", 1e-2), ("fp8", 8e-2)])
def test_quantized_w0_close_to_dense(fmt, tol):
    linear = nn.Linear(96, 64)
    dense = POETLinear.from_linear(linear, POETConfig(block_size=32, init="keep"))
    quant = POETLinear.from_linear(
        linear, POETConfig(block_size=32, init="keep", w0_format=fmt, quant_group_size=32)
    )
    assert quant.w0.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    x = torch.randn(8, 96)
    rel = (quant(x) - dense(x)).norm() / dense(x).norm()
    assert rel < tol
    quant(x).sum().backward()
    assert quant.theta_in.grad is not None
    storage = quant.w0.dtype
    with torch.no_grad():  # small Q: the merge's exact Cayley map is then the forward's map
        quant.theta_in.normal_(0, 0.01)
    before = quant(x)
    quant.merge_()  # re-quantizes the merged weight
    assert quant.w0.dtype == storage
    rel = (quant(x) - before).norm() / before.norm()
    assert rel < tol


def test_activation_checkpointing_gives_same_gradients():
    from torch.utils.checkpoint import checkpoint

    layer, _ = make_layer(16, 24, 8)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    plain = [x.grad.clone(), layer.theta_in.grad.clone()]
    x.grad = None
    layer.zero_grad()
    checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, plain[0])
    torch.testing.assert_close(layer.theta_in.grad, plain[1])


def test_torch_compile_traces_the_custom_op():
    layer = POETLinear(32, 48, config=POETConfig(block_size=16))
    x = torch.randn(4, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.theta_in.grad is not None
