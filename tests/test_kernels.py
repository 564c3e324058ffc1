"""The Triton kernels against the float64 references.

* ``interpret`` tests run the kernels on CPU through Triton's interpreter. The interpreter is
  chosen when ``triton.jit`` decorates a kernel, so the fixture loads private copies of the two
  kernel modules with ``TRITON_INTERPRET=1`` set (and sets it again while they run); the
  ordinary modules, used by the GPU tests and the rest of the suite in the same process, are
  not touched.
* ``gpu`` tests run the compiled kernels at real sizes (skipped without CUDA).

Inputs are fresh random draws; outputs are pre-filled with NaN so unwritten elements fail.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from poetx.kernels.block_rotate_ref import (
    attach_inverse,
    block_gram_reference,
    block_rotate_reference,
    gather_columns,
)
from poetx.ortho.cayley import rotation_delta_backward_reference, rotation_delta_reference

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "poetx" / "kernels"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------
# helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double().to(out.device)
    assert torch.isfinite(out).all(), "non-finite (unwritten?) elements"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def padded_index(dim: int, nb: int, b: int, device="cpu", permute=True) -> torch.Tensor:
    perm = torch.randperm(dim) if permute else torch.arange(dim)
    return torch.cat([perm, torch.full((nb * b - dim,), -1, dtype=torch.long)]).to(device)


def nan_like(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _load_copy(name: str):
    spec = importlib.util.spec_from_file_location(f"_interp_{name}", KERNELS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_INTERP: dict = {}


def _numpy2_index_shim(ti):
    """Triton 3.6's interpreter converts 1-element arrays with ``int()``, which numpy >= 2.3
    refuses (runtime loop bounds); give its tensors an ``__index__`` that takes element 0."""
    orig = ti._patch_lang_tensor
    if getattr(orig, "_poetx_shim", False):
        return orig

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._poetx_shim = True
    return patched


def interpreted_kernels(monkeypatch, *names: str) -> list:
    """Copies of the kernel modules ``names`` (loaded once per session) whose kernels run in
    Triton's interpreter for the rest of the test."""
    import triton.runtime.interpreter as ti

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ti, "_patch_lang_tensor", _numpy2_index_shim(ti))
    for name in names:
        if name not in _INTERP:
            _INTERP[name] = _load_copy(name)
        assert _INTERP[name]._interpreting()
    return [_INTERP[name] for name in names]


@pytest.fixture
def interp(monkeypatch):
    """``(block_rotate, cayley_neumann)`` module copies whose kernels run in the interpreter."""
    br, cn = interpreted_kernels(monkeypatch, "block_rotate", "cayley_neumann")
    saved = dict(br.OPTIONS)
    yield br, cn
    br.OPTIONS.update(saved)


# --------------------------------------------------------------------------------------------
# interpreter (CPU)

# (dim, block): divisible and padded
SMALL = [(12, 4), (10, 4), (16, 8), (13, 8), (48, 16), (40, 16)]


@pytest.mark.interpret
@pytest.mark.parametrize("dim,b", SMALL)
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_rotate_interpreted(interp, dim, b, gather):
    br, _ = interp
    br.OPTIONS["gather"] = gather
    nb = -(-dim // b)
    T = 21
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        for in_idx in (None, padded_index(dim, nb, b)):
            for out_idx in (None, padded_index(dim, nb, b)):
                for transpose in (False, True):
                    x = torch.randn(T, dim).to(dtype)
                    d = (0.3 * torch.randn(nb, b, b)).to(dtype)
                    out = nan_like((T, dim), dtype, "cpu")
                    y = br.block_rotate(x, d, in_idx, out_idx, dim, transpose, out=out)
                    assert y.data_ptr() == out.data_ptr()
                    ref = block_rotate_reference(x.double(), d.double(), in_idx, out_idx, dim,
                                                 transpose)
                    assert rel_err(y, ref) < tol, (dtype, in_idx is None, out_idx is None,
                                                   transpose)


@pytest.mark.interpret
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_rotate_interpreted_shapes(interp, gather):
    """Input and output widths that differ from ``nb*b`` and from each other."""
    br, _ = interp
    br.OPTIONS["gather"] = gather
    b, nb, T = 8, 3, 9
    x = torch.randn(T, 20)
    d = 0.3 * torch.randn(nb, b, b)
    for out_cols in (20, 24):
        y = br.block_rotate(x, d, None, None, out_cols, out=nan_like((T, out_cols),
                                                                     torch.float32, "cpu"))
        ref = block_rotate_reference(x.double(), d.double(), None, None, out_cols)
        assert rel_err(y, ref) < 1e-6
    assert br.block_rotate(x[:0], d, None, None, 20).shape == (0, 20)


@pytest.mark.interpret
def test_scatter_reads_the_attached_inverse(interp):
    """A rotation scattering by an index reads the inverse attached to it, until the index
    is changed in place (then it inverts the index again)."""
    br, _ = interp
    b, nb, T = 8, 3, 5
    dim = nb * b
    x = torch.randn(T, dim)
    d = 0.3 * torch.randn(nb, b, b)
    index = padded_index(dim, nb, b)
    other = padded_index(dim, nb, b)
    # attach the inverse of another permutation: the scatter follows it
    attach_inverse(index, torch.argsort(other).to(torch.int32))
    y = br.block_rotate(x, d, None, index, dim)
    assert torch.equal(y, br.block_rotate(x, d, None, other.clone(), dim))
    index.copy_(index.clone())  # changed in place: the attachment no longer holds
    ref = block_rotate_reference(x.double(), d.double(), None, index, dim)
    assert rel_err(br.block_rotate(x, d, None, index, dim), ref) < 1e-6


@pytest.mark.interpret
@pytest.mark.parametrize("dim,b", SMALL)
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_gram_interpreted(interp, dim, b, gather):
    br, _ = interp
    br.OPTIONS["gather"] = gather
    nb = -(-dim // b)
    T = 37
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-5)):
        for a_idx in (None, padded_index(dim, nb, b)):
            for b_idx in (None, padded_index(dim, nb, b)):
                a = torch.randn(T, dim).to(dtype)
                c = torch.randn(T, dim).to(dtype)
                out = nan_like((nb, b, b), torch.float32, "cpu")
                g = br.block_gram(a, c, a_idx, b_idx, nb, b, out=out)
                ref = block_gram_reference(a.double(), c.double(), a_idx, b_idx, nb, b)
                assert g.dtype == torch.float32
                assert rel_err(g, ref) < tol


@pytest.mark.interpret
@pytest.mark.parametrize("dim,b", [(12, 4), (13, 8), (40, 16)])
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_staged_gather_shared_by_products(interp, dim, b, gather):
    """A tensor gathered once (``staged_gather``) and handed to a rotation and a Gram gives
    what each product gives from the tensor and its index (the backward's shared gather):
    bitwise, since the staged products permute the same way inside; ``direct`` leaves the
    pair unchanged."""
    br, _ = interp
    br.OPTIONS["gather"] = gather
    nb, T = -(-dim // b), 19
    x, c = torch.randn(T, dim), torch.randn(T, dim)
    d = 0.3 * torch.randn(nb, b, b)
    index = padded_index(dim, nb, b)
    shared, shared_index = br.staged_gather(x, index, nb * b)
    if gather == "direct":
        assert shared is x and shared_index is index
    else:
        assert shared.shape == (T, nb * b) and shared_index is None
        assert torch.equal(shared, gather_columns(x, index, nb * b))
    rotated = br.block_rotate(shared, d, shared_index, None, dim, True)
    assert torch.equal(rotated, br.block_rotate(x, d, index, None, dim, True))
    gram = br.block_gram(shared, c, shared_index, None, nb, b)
    assert torch.equal(gram, br.block_gram(x, c, index, None, nb, b))
    gram = br.block_gram(c, shared, None, shared_index, nb, b)  # as the Gram's second operand
    assert torch.equal(gram, br.block_gram(c, x, None, index, nb, b))
    forward = br.block_rotate(shared, d, shared_index, None, dim)  # mem mode's recomputed v
    assert torch.equal(forward, br.block_rotate(x, d, index, None, dim))
    assert br.staged_gather(x, None, nb * b) == (x, None)


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [2, 3])
def test_gram_interpreted_split(interp, splits):
    """The token reduction split over programs (atomic adds into a zeroed output)."""
    br, _ = interp
    br.OPTIONS["gram_splits"] = splits
    b, nb, T = 8, 2, 150
    a, c = torch.randn(T, 16), torch.randn(T, 16)
    idx = padded_index(16, nb, b)
    g = br.block_gram(a, c, idx, None, nb, b, out=nan_like((nb, b, b), torch.float32, "cpu"))
    assert rel_err(g, block_gram_reference(a.double(), c.double(), idx, None, nb, b)) < 1e-6


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("indexed", [False, True])
def test_gram_interpreted_accumulate(interp, splits, indexed):
    """``accumulate``: the Gram is added into what ``out`` holds (the gradient sink of a
    build), split or not, every element once."""
    br, _ = interp
    br.OPTIONS["gram_splits"] = splits
    b, nb, T = 8, 2, 150
    a, c = torch.randn(T, 13), torch.randn(T, 13)
    idx = padded_index(13, nb, b) if indexed else None
    before = torch.randn(nb, b, b)
    out = before.clone()
    g = br.block_gram(a, c, idx, idx, nb, b, out=out, accumulate=True)
    assert g is out
    ref = before.double() + block_gram_reference(a.double(), c.double(), idx, idx, nb, b)
    assert rel_err(g, ref) < 1e-6
    with pytest.raises(ValueError, match="accumulate needs out"):
        br.block_gram(a, c, idx, idx, nb, b, accumulate=True)


@pytest.mark.interpret
@pytest.mark.parametrize("b,nb,valid", [(4, 3, None), (4, 2, 3), (8, 2, None), (8, 3, 5),
                                        (16, 2, None), (16, 3, 11), (5, 2, 4), (32, 3, 21),
                                        (48, 2, None)])
@pytest.mark.parametrize("terms", [1, 2, 3, 4])
def test_cayley_interpreted(interp, b, nb, valid, terms):
    _, cn = interp
    theta = 0.2 * torch.randn(nb, b * (b - 1) // 2)
    ref = rotation_delta_reference(theta.double(), b, terms, valid)
    out = nan_like((nb, b, b), torch.float32, "cpu")
    d = cn.cayley_neumann_delta(theta, b, terms, valid, torch.float32, out=out)
    assert rel_err(d, ref) < 1e-6
    d16 = cn.cayley_neumann_delta(theta, b, terms, valid, torch.float16)
    assert d16.dtype == torch.float16 and rel_err(d16, ref) < 1e-3
    g = torch.randn(nb, b, b)
    gref = rotation_delta_backward_reference(theta.double(), g.double(), b, terms, valid)
    gout = nan_like(theta.shape, torch.float32, "cpu")
    gt = cn.cayley_neumann_delta_backward(theta, g, b, terms, valid, out=gout)
    assert gt.dtype == theta.dtype and rel_err(gt, gref) < 1e-6


@pytest.mark.interpret
@pytest.mark.parametrize("b,nb,valid,terms", [(16, 3, None, 3), (32, 2, 21, 3), (5, 2, 4, 3),
                                              (16, 2, 9, 2)])
def test_cayley_interpreted_bf16_products(interp, monkeypatch, b, nb, valid, terms):
    """``POETX_CAYLEY_PRECISION=bf16``: operands of the products rounded to bf16 (relative
    2^-9 each, so 2^-8 per product), the first-order terms exact where the kernels add them
    in float32. The product terms are at most about ``||Q||`` (0.5 here) to 1x the result,
    so the relative error is below 2^-8 = 3.9e-3, in both directions."""
    _, cn = interp
    monkeypatch.setenv("POETX_CAYLEY_PRECISION", "bf16")
    npar = b * (b - 1) // 2
    theta = torch.randn(nb, npar)
    theta *= 0.5 / (2 * npar) ** 0.5  # ||Q||_F = 0.5 per block (the default max_q_norm is 1)
    ref = rotation_delta_reference(theta.double(), b, terms, valid)
    d = cn.cayley_neumann_delta(theta, b, terms, valid, torch.float32)
    if terms != 3:  # bf16 is not used where 2Q itself would be a product
        assert rel_err(d, ref) < 1e-6
        return
    assert 1e-7 < rel_err(d, ref) < 3.9e-3  # bf16 products: not float32-exact, in the bound
    g = torch.randn(nb, b, b)
    gref = rotation_delta_backward_reference(theta.double(), g.double(), b, terms, valid)
    err = rel_err(cn.cayley_neumann_delta_backward(theta, g, b, terms, valid), gref)
    assert err < 3.9e-3


@pytest.mark.interpret
@pytest.mark.parametrize("b,sizes,valid", [(16, (2, 1, 3), None), (32, (1, 2), 21),
                                           (16, (3,), 9)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cayley_interpreted_stacked_sides(interp, b, sizes, valid, out_dtype):
    """Several skew tensors (separate allocations, as a batched build's sides) read in place
    through the row table give, block for block and bit for bit, what their concatenation
    gives, forward and backward, including a padded last block; a side that is not float32
    and contiguous falls back to the concatenated copy."""
    _, cn = interp
    npar = b * (b - 1) // 2
    sides = [_theta_with_norm(nb, b, 0.5) for nb in sizes]
    whole = torch.cat(sides)
    g = torch.randn(whole.shape[0], b, b)
    d_ref = cn.cayley_neumann_delta(whole, b, 3, valid, out_dtype)
    gt_ref = cn.cayley_neumann_delta_backward(whole, g, b, 3, valid, build_dtype=out_dtype)
    assert torch.equal(cn.cayley_neumann_delta(sides, b, 3, valid, out_dtype), d_ref)
    assert torch.equal(cn.cayley_neumann_delta_backward(sides, g, b, 3, valid,
                                                        build_dtype=out_dtype), gt_ref)
    assert rel_err(d_ref, rotation_delta_reference(whole.double(), b, 3, valid)) < 4e-3
    if len(sides) > 1:
        table = cn._theta_rows(sides, npar)
        assert cn._theta_rows(sides, npar) is table  # remembered for a captured replay
        base = sides[0].data_ptr() // 4
        want = [t.data_ptr() // 4 - base + j * npar for t in sides for j in range(t.shape[0])]
        assert table.tolist() == want
        strided = [sides[0], torch.cat(sides[1:]).t().contiguous().t()]  # not contiguous
        assert torch.equal(cn.cayley_neumann_delta(strided, b, 3, valid, out_dtype), d_ref)
    with pytest.raises(ValueError, match="columns"):
        cn.cayley_neumann_delta([sides[0], torch.zeros(1, npar + 1)], b, 3, valid, out_dtype)


def _theta_with_norm(nb: int, b: int, q_norm: float, device="cpu") -> torch.Tensor:
    """Skew parameters whose blocks have ``||Q||_F`` about ``q_norm``."""
    npar = b * (b - 1) // 2
    return torch.randn(nb, npar, device=device) * (q_norm / (2 * npar) ** 0.5)


@pytest.mark.interpret
@pytest.mark.parametrize("b,nb,valid,cap,tile_w,tiles", [
    (64, 3, 50, 64, None, (64, 64)),  # b = 64, one tile per block
    (128, 2, 100, 128, None, (128, 64)),  # one 128 tile, 2 x 2 W pairs of 64
    (192, 1, 150, 128, None, (64, 64)),  # b not a multiple of 128: 64 tiles
    (256, 1, 201, 128, 128, (128, 128)),  # 2 x 2 tiles of 128, off-diagonal W pairs of 128
])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cayley_interpreted_tiles(interp, monkeypatch, b, nb, valid, cap, tile_w, tiles,
                                  precision):
    """The fast path's tile shapes (the compiled default is 64; 128 on request), padded last
    blocks included. ``tf32`` runs float32 products here (float32-exact); ``bf16``
    stores the operands in bf16 and stays inside the bound of
    ``test_cayley_interpreted_bf16_products``; a bf16 build gets bf16 products by default."""
    _, cn = interp
    monkeypatch.setitem(cn.OPTIONS, "tile", cap)
    monkeypatch.setitem(cn.OPTIONS, "tile_w", tile_w)
    monkeypatch.setenv("POETX_CAYLEY_PRECISION", precision)
    cfg = cn._fast_config(b, cn._precision("tf32"))
    assert (cfg.tile, cfg.tile_w) == tiles
    assert cfg.storage == (torch.bfloat16 if precision == "bf16" else torch.float32)
    theta, g, ref, gref, gt = _check_fp32_build_against_reference(cn, nb, b, valid, precision)
    monkeypatch.delenv("POETX_CAYLEY_PRECISION")
    d16 = cn.cayley_neumann_delta(theta, b, 3, valid, torch.bfloat16)
    assert rel_err(d16, ref) < 4e-3  # (the interpreter truncates to bf16: ~2x the rounding)
    g16 = cn.cayley_neumann_delta_backward(theta, g, b, 3, valid, build_dtype=torch.bfloat16)
    assert 1e-7 < rel_err(g16, gref) < 3.9e-3
    # a half-precision theta gets its gradient in its own dtype
    gh = cn.cayley_neumann_delta_backward(theta.half(), g, b, 3, valid)
    assert gh.dtype == torch.float16 and rel_err(gh, gt) < 1e-3


def _check_fp32_build_against_reference(cn, nb: int, b: int, valid: int, precision: str):
    """A float32 build and its backward (into NaN-filled outputs) against float64: exact to
    float32 with ``tf32`` (float32 products in the interpreter), inside the bf16 bound with
    ``bf16``. Returns ``(theta, g, ref, gref, grad)``."""
    theta = _theta_with_norm(nb, b, 0.5)
    ref = rotation_delta_reference(theta.double(), b, 3, valid)
    d = cn.cayley_neumann_delta(theta, b, 3, valid, torch.float32,
                                out=nan_like((nb, b, b), torch.float32, "cpu"))
    g = torch.randn(nb, b, b)
    gref = rotation_delta_backward_reference(theta.double(), g.double(), b, 3, valid)
    gt = cn.cayley_neumann_delta_backward(theta, g, b, 3, valid,
                                          out=nan_like(theta.shape, torch.float32, "cpu"))
    if precision == "tf32":
        assert rel_err(d, ref) < 1e-6 and rel_err(gt, gref) < 1e-6
    else:
        assert 1e-7 < rel_err(d, ref) < 3.9e-3 and 1e-7 < rel_err(gt, gref) < 3.9e-3
    return theta, g, ref, gref, gt


@pytest.mark.interpret
def test_cayley_interpreted_on_slices(interp):
    """Rows of a larger theta in, a slice of a larger result out (what the batched build of
    ``poetx.ops.rotation_group`` passes, chunk by chunk): only the slice is written."""
    _, cn = interp
    b = 16
    theta = 0.2 * torch.randn(7, b * (b - 1) // 2)
    out = nan_like((7, b, b), torch.float32, "cpu")
    cn.cayley_neumann_delta(theta[2:5], b, 3, 9, torch.float32, out=out[2:5])
    assert rel_err(out[2:5], rotation_delta_reference(theta[2:5].double(), b, 3, 9)) < 1e-6
    assert out[:2].isnan().all() and out[5:].isnan().all()
    g = torch.randn(7, b, b)
    gout = nan_like(theta.shape, torch.float32, "cpu")
    cn.cayley_neumann_delta_backward(theta[2:5], g[2:5], b, 3, 9, out=gout[2:5])
    gref = rotation_delta_backward_reference(theta[2:5].double(), g[2:5].double(), b, 3, 9)
    assert rel_err(gout[2:5], gref) < 1e-6
    assert gout[:2].isnan().all() and gout[5:].isnan().all()


# --------------------------------------------------------------------------------------------
# GPU (compiled kernels, real sizes)

GPU_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 2e-5}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,b", [(4096, 256), (14336, 512), (2736, 256), (1000, 64)])
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_rotate_gpu(dtype, dim, b, gather):
    from poetx.kernels import block_rotate as br

    saved = dict(br.OPTIONS)
    br.OPTIONS["gather"] = gather
    try:
        nb = -(-dim // b)
        T = 1000
        for in_idx, out_idx, transpose in ((True, False, False), (False, True, False),
                                           (True, False, True), (False, True, True),
                                           (False, False, False), (True, True, True)):
            ii = padded_index(dim, nb, b, "cuda") if in_idx else None
            oi = padded_index(dim, nb, b, "cuda") if out_idx else None
            x = torch.randn(T, dim, device="cuda").to(dtype)
            d = (0.05 * torch.randn(nb, b, b, device="cuda")).to(dtype)
            out = nan_like((T, dim), dtype, "cuda")
            y = br.block_rotate(x, d, ii, oi, dim, transpose, out=out)
            ref = block_rotate_reference(x.double(), d.double(), ii, oi, dim, transpose)
            err = rel_err(y, ref)
            assert err < GPU_TOL[dtype], (in_idx, out_idx, transpose, err)
    finally:
        br.OPTIONS.update(saved)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,b,T", [(4096, 256, 2048), (14336, 512, 1000), (2736, 256, 333)])
@pytest.mark.parametrize("gather", ["direct", "staged"])
def test_gram_gpu(dtype, dim, b, T, gather):
    from poetx.kernels import block_rotate as br

    saved = dict(br.OPTIONS)
    br.OPTIONS["gather"] = gather
    try:
        nb = -(-dim // b)
        for a_idx, b_idx in ((True, False), (False, True), (False, False)):
            ai = padded_index(dim, nb, b, "cuda") if a_idx else None
            bi = padded_index(dim, nb, b, "cuda") if b_idx else None
            a = torch.randn(T, dim, device="cuda").to(dtype)
            c = torch.randn(T, dim, device="cuda").to(dtype)
            out = nan_like((nb, b, b), torch.float32, "cuda")
            g = br.block_gram(a, c, ai, bi, nb, b, out=out)
            ref = block_gram_reference(a.double(), c.double(), ai, bi, nb, b)
            assert rel_err(g, ref) < (1e-5 if dtype == torch.bfloat16 else 2e-5)
            # added into a sink (TMA reduce-adds where there is no index)
            before = torch.randn(nb, b, b, device="cuda")
            g = br.block_gram(a, c, ai, bi, nb, b, out=before.clone(), accumulate=True)
            assert rel_err(g, before.double() + ref) < (1e-5 if dtype == torch.bfloat16 else 2e-5)
    finally:
        br.OPTIONS.update(saved)


CAYLEY_GPU_SHAPES = [(256, 16, None), (512, 28, None), (256, 11, 176), (100, 3, 37), (64, 4, None),
                     (128, 9, 100), (192, 5, 130)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,nb,valid", CAYLEY_GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tile", [128, None])
def test_cayley_gpu(monkeypatch, b, nb, valid, out_dtype, tile):
    """Default precisions (bf16 products for a bf16 build and its backward, tf32x3 / tf32 for
    float32) at ``||Q||_F = 1``, the default merge guard; ``tile``: the fast path's tile cap
    (None: the default, 64)."""
    from poetx.kernels import cayley_neumann as cn

    monkeypatch.delenv("POETX_CAYLEY_PRECISION", raising=False)
    monkeypatch.setitem(cn.OPTIONS, "tile", tile)
    theta = _theta_with_norm(nb, b, 1.0, "cuda")
    ref = rotation_delta_reference(theta.double(), b, 3, valid)
    out = nan_like((nb, b, b), out_dtype, "cuda")
    d = cn.cayley_neumann_delta(theta, b, 3, valid, out_dtype, out=out)
    assert rel_err(d, ref) < (4e-3 if out_dtype == torch.bfloat16 else 1e-5)
    g = torch.randn(nb, b, b, device="cuda")
    gref = rotation_delta_backward_reference(theta.double(), g.double(), b, 3, valid)
    gt = cn.cayley_neumann_delta_backward(theta, g, b, 3, valid, build_dtype=out_dtype,
                                          out=nan_like(theta.shape, torch.float32, "cuda"))
    assert rel_err(gt, gref) < 2e-3  # tf32 or bf16 products (POETX_CAYLEY_PRECISION to change)
    d2 = cn.cayley_neumann_delta(theta, b, 2, valid, out_dtype)  # Horner path
    assert rel_err(d2, rotation_delta_reference(theta.double(), b, 2, valid)) < 4e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("b,nb,valid", CAYLEY_GPU_SHAPES)
@pytest.mark.parametrize("tile", [128, None])
def test_cayley_gpu_tf32_large_q(monkeypatch, b, nb, valid, tile):
    """tf32 products (``POETX_CAYLEY_PRECISION=tf32``) far past the merge guard
    (``||Q||_F`` 5-10)."""
    from poetx.kernels import cayley_neumann as cn

    monkeypatch.setenv("POETX_CAYLEY_PRECISION", "tf32")
    monkeypatch.setitem(cn.OPTIONS, "tile", tile)
    theta = 0.02 * torch.randn(nb, b * (b - 1) // 2, device="cuda")
    ref = rotation_delta_reference(theta.double(), b, 3, valid)
    d = cn.cayley_neumann_delta(theta, b, 3, valid, torch.bfloat16,
                                out=nan_like((nb, b, b), torch.bfloat16, "cuda"))
    assert rel_err(d, ref) < 4e-3
    g = torch.randn(nb, b, b, device="cuda")
    gref = rotation_delta_backward_reference(theta.double(), g.double(), b, 3, valid)
    gt = cn.cayley_neumann_delta_backward(theta, g, b, 3, valid, build_dtype=torch.bfloat16,
                                          out=nan_like(theta.shape, torch.float32, "cuda"))
    assert rel_err(gt, gref) < 2e-3


def _layer_pair(n, m, b, mode, dtype):
    from poetx.config import POETConfig
    from poetx.layers.poet_linear import POETLinear

    cfg = POETConfig(block_size=b, mode=mode)
    fast = POETLinear(n, m, bias=True, config=cfg, name="l", device="cuda", dtype=dtype)
    ref = POETLinear(n, m, bias=True, config=cfg, name="l", device="cpu", dtype=torch.float64)
    with torch.no_grad():
        fast.theta_in.normal_(0, 0.005)
        fast.theta_out.normal_(0, 0.005)
        fast.bias.normal_(0, 0.1)
        for name in ("theta_in", "theta_out", "bias", "w0"):
            getattr(ref, name).copy_(getattr(fast, name).double().cpu())
        ref.perm_in.copy_(fast.perm_in.cpu())
        ref.perm_out.copy_(fast.perm_out.cpu())
    return fast, ref


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,m,b", [(1024, 2736, 256), (2048, 512, 512)])
@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_poet_linear_gpu_matches_cpu_float64(n, m, b, mode, dtype):
    fast, ref = _layer_pair(n, m, b, mode, dtype)
    x = torch.randn(3, 171, n, device="cuda").to(dtype).requires_grad_(True)
    gy = torch.randn(3, 171, m, device="cuda").to(dtype)
    y = fast(x)
    y.backward(gy)
    xr = x.detach().double().cpu().requires_grad_(True)
    yr = ref(xr)
    yr.backward(gy.double().cpu())
    tol = {torch.bfloat16: 2e-2, torch.float32: 2e-3}[dtype]
    assert rel_err(y, yr) < tol
    assert rel_err(x.grad, xr.grad) < tol
    assert rel_err(fast.theta_in.grad, ref.theta_in.grad) < tol
    assert rel_err(fast.theta_out.grad, ref.theta_out.grad) < tol
    assert rel_err(fast.bias.grad, ref.bias.grad) < tol


@pytest.mark.interpret
@pytest.mark.parametrize("rows", [3, 4, 11])
def test_row_kernels_walk_several_rows_per_program(interp, rows):
    """The staged gather, the fan-out and the fan-in with several rows per program (the
    compiled default takes 2 or more; the interpreter otherwise runs one), the last program
    ragged: exact against the references."""
    from poetx.kernels.block_rotate_ref import fan_in_reference, fan_out_reference

    br, _ = interp
    br.OPTIONS["rows_per_program"] = rows
    dim, b, T = 13, 8, 11
    nb = -(-dim // b)
    x = torch.randn(T, dim)
    index = padded_index(dim, nb, b)
    assert torch.equal(br.permute_columns(x, index, nb * b), gather_columns(x, index, nb * b))
    indices = torch.stack([index, padded_index(dim, nb, b)])
    assert torch.equal(br.fan_out(x, indices, nb * b), fan_out_reference(x, indices, nb * b))
    grads = [torch.randn(T, nb * b) for _ in range(2)]
    for g, i in zip(grads, indices, strict=True):
        g[:, i < 0] = 0.0
    assert torch.equal(br.fan_in(grads, indices, dim), fan_in_reference(grads, indices, dim))


@pytest.mark.interpret
@pytest.mark.parametrize("dim,b", [(12, 4), (13, 8), (40, 16)])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_fan_out_and_fan_in_interpreted(interp, dim, b, k):
    """Several permutations of one tensor in one pass, and the summed scatter of their
    gradients, against the references: exact (a gather moves values; the sum runs in the
    reference's order), phantom positions zero, a missing gradient counted as zero."""
    from poetx.kernels.block_rotate_ref import fan_in_reference, fan_out_reference

    br, _ = interp
    nb, T = -(-dim // b), 11
    positions = nb * b
    x = torch.randn(T, dim)
    indices = torch.stack([padded_index(dim, nb, b) for _ in range(k)])
    out = br.fan_out(x, indices, positions)
    assert out.shape == (k, T, positions)
    assert torch.equal(out, fan_out_reference(x, indices, positions))
    grads = [torch.randn(T, positions) for _ in range(k)]
    for i in range(k):  # phantom positions carry no gradient to any column
        grads[i][:, indices[i] < 0] = 0.0
    assert torch.equal(br.fan_in(grads, indices, dim), fan_in_reference(grads, indices, dim))
    if k > 1:
        grads[1] = None
        assert torch.equal(br.fan_in(grads, indices, dim),
                           fan_in_reference(grads, indices, dim))
    assert br.fan_in([None] * k, indices, dim) is None
    # the layers' form: separate index vectors read in place, their inverses attached
    rows = [indices[i].clone() for i in range(k)]
    for r in rows:
        attach_inverse(r, torch.argsort(r[:dim]).to(torch.int32))
    assert torch.equal(br.fan_out(x, rows, positions), out)
    grads[0] = torch.randn(T, positions)
    grads[0][:, indices[0] < 0] = 0.0
    assert torch.equal(br.fan_in(grads, rows, dim),
                       fan_in_reference(grads, indices, dim))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,b,k", [(4096, 256, 3), (4096, 256, 2), (14336, 256, 1),
                                     (2736, 256, 4)])
def test_fan_out_and_fan_in_gpu(dtype, dim, b, k):
    """The compiled fan-out / fan-in at model sizes: bitwise equal to the references (one
    rounding of a float32 sum in order, for up to 3 gradients a launch)."""
    from poetx.kernels import block_rotate as br
    from poetx.kernels.block_rotate_ref import fan_in_reference, fan_out_reference

    nb, T = -(-dim // b), 1000
    positions = nb * b
    x = torch.randn(T, dim, device="cuda").to(dtype)
    indices = torch.stack([padded_index(dim, nb, b, "cuda") for _ in range(k)])
    assert torch.equal(br.fan_out(x, indices, positions), fan_out_reference(x, indices,
                                                                          positions))
    grads = [torch.randn(T, positions, device="cuda").to(dtype) for _ in range(k)]
    for i in range(k):
        grads[i][:, indices[i] < 0] = 0.0
    got = br.fan_in(grads, indices, dim)
    ref = fan_in_reference(grads, indices, dim)
    if k <= br.FAN_MAX:
        assert torch.equal(got, ref)
    else:  # rounded to the dtype between launches
        assert rel_err(got, ref) < GPU_TOL[dtype]
