"""The cross-entropy kernels: the references against autograd through ``F.cross_entropy``
(float64), the kernels against the references (Triton's interpreter on CPU, compiled on a GPU).
Outputs are pre-filled with NaN where the kernel writes a fresh tensor."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from poetx.kernels.cross_entropy_ref import (
    cross_entropy_grad_reference,
    logsumexp_pick_reference,
)
from tests.test_kernels import interpreted_kernels, nan_like

IGNORE = -100


def _problem(n: int, vocab: int, dtype=torch.float64, device="cpu", scale=3.0):
    torch.manual_seed(n + vocab)
    logits = (torch.randn(n, vocab, dtype=torch.float64) * scale).to(dtype).to(device)
    targets = torch.randint(0, vocab, (n,))
    targets[::5] = IGNORE
    weights = torch.rand(n, dtype=torch.float64) * (targets >= 0)
    return logits, targets.to(device), weights.to(device)


@pytest.mark.parametrize(("n", "vocab"), [(7, 50), (16, 300), (3, 1)])
def test_references_match_autograd(n, vocab):
    """lse and the picked logit give each token's loss; the gradient reference is the gradient
    of the weighted sum of those losses, the vocabulary whole or cut into two chunks."""
    logits, targets, weights = _problem(n, vocab)
    lse, picked = logsumexp_pick_reference(logits, targets)
    per_token = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close((lse - picked) * (targets >= 0), per_token, rtol=1e-13, atol=0)
    leaf = logits.clone().requires_grad_()
    (F.cross_entropy(leaf, targets, ignore_index=IGNORE, reduction="none") * weights).sum()\
        .backward()
    torch.testing.assert_close(cross_entropy_grad_reference(logits, lse, targets, weights),
                               leaf.grad, rtol=1e-13, atol=1e-15)
    cut = vocab // 2
    halves = [cross_entropy_grad_reference(logits[:, :cut], lse, targets, weights, 0),
              cross_entropy_grad_reference(logits[:, cut:], lse, targets, weights, cut)]
    torch.testing.assert_close(torch.cat(halves, 1), leaf.grad, rtol=1e-13, atol=1e-15)


def test_picked_is_zero_for_targets_outside_the_logits():
    logits = torch.randn(3, 10, dtype=torch.float64)
    _, picked = logsumexp_pick_reference(logits, torch.tensor([IGNORE, 10, 4]))
    assert picked[:2].tolist() == [0.0, 0.0] and picked[2] == logits[2, 4]


def assert_grad_within_rounding(got, want, logits, lse, weights):
    """Each gradient within one rounding of the logits' dtype of the float64 value, plus what
    float32 arithmetic costs: ``exp(x - lse)`` carries the rounding of ``x - lse`` (a few
    float32 ulps of ``|x| + |lse|``, relative) and ``p - 1`` one float32 ulp of the row's
    weight."""
    eps32 = torch.finfo(torch.float32).eps
    eps_out = torch.finfo(got.dtype).eps
    spread = logits.double().abs() + lse.double().abs().unsqueeze(1) + 1
    weight = weights.double().to(got.device).unsqueeze(1)
    tol = (eps_out + 4 * eps32 * spread) * want.abs() + 2 * eps32 * weight
    err = (got.double() - want).abs()
    assert torch.isfinite(got).all() and (err <= tol).all(), (err - tol).max()


@pytest.fixture
def interp_ce(monkeypatch):
    """A copy of ``cross_entropy`` whose kernels run in Triton's interpreter."""
    (module,) = interpreted_kernels(monkeypatch, "cross_entropy")
    return module


# A vocabulary over several row blocks with a ragged end; one inside a single block; sizes
# not multiples of the gradient tiles.
SHAPES = [(9, 700, 256), (5, 40, 4096), (13, 1030, 512)]


@pytest.mark.interpret
@pytest.mark.parametrize(("n", "vocab", "row_block"), SHAPES)
def test_kernels_interpreted_float64(interp_ce, monkeypatch, n, vocab, row_block):
    """float64: the kernels compute in float64 and match the references to rounding."""
    monkeypatch.setattr(interp_ce, "ROW_BLOCK", row_block)
    logits, targets, weights = _problem(n, vocab)
    out = (nan_like((n,), torch.float64, "cpu"), nan_like((n,), torch.float64, "cpu"))
    lse, picked = interp_ce.logsumexp_pick(logits, targets, out=out)
    assert lse is out[0] and picked is out[1]
    want_lse, want_picked = logsumexp_pick_reference(logits, targets)
    torch.testing.assert_close(lse, want_lse, rtol=1e-13, atol=0)
    torch.testing.assert_close(picked, want_picked, rtol=0, atol=0)
    offset = vocab // 3  # a chunk of the vocabulary, some targets outside it
    chunk = logits[:, offset:].contiguous()
    want = cross_entropy_grad_reference(chunk, lse, targets, weights, offset)
    got = interp_ce.cross_entropy_grad_(chunk, lse, targets, weights, offset)
    assert got is chunk
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_interpreted_16_and_32_bit(interp_ce, dtype):
    """16/32-bit logits, statistics in float32: lse and picked to float32 rounding of the
    float64 reference, each gradient within one rounding of the logits' dtype; rows that
    are not contiguous with each other (a column slice of wider logits)."""
    n, vocab = 11, 900
    wide, targets, weights = _problem(n, vocab + 20)
    logits = wide.to(dtype)[:, :vocab]
    targets = targets.clamp_max(vocab - 1)
    lse, picked = interp_ce.logsumexp_pick(logits, targets)
    assert lse.dtype == torch.float32
    want_lse, want_picked = logsumexp_pick_reference(logits.double(), targets)
    # float32 sums over the lanes' partial sums: a few ulps of lse
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(picked.double(), want_picked, rtol=0, atol=0)
    want = cross_entropy_grad_reference(logits.double(), want_lse, targets, weights)
    got = interp_ce.cross_entropy_grad_(logits.clone(), lse, targets, weights.float())
    assert_grad_within_rounding(got, want, logits, want_lse, weights)


def test_kernels_name_bad_shapes():
    pytest.importorskip("triton")
    from poetx.kernels.cross_entropy import cross_entropy_grad_, logsumexp_pick

    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets"):
        logsumexp_pick(logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_grad_(logits.t(), torch.zeros(10), torch.zeros(10, dtype=torch.long),
                            torch.zeros(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("n", "vocab"), [(4096, 128256), (300, 32000), (33, 50257)])
def test_kernels_gpu(n, vocab):
    """Compiled, at real vocabularies, bf16 logits: against the float64 references."""
    from poetx.kernels.cross_entropy import cross_entropy_grad_, logsumexp_pick

    logits, targets, weights = _problem(n, vocab, torch.bfloat16, "cuda")
    lse, picked = logsumexp_pick(logits, targets)
    want_lse, want_picked = logsumexp_pick_reference(logits.double(), targets)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(picked.double(), want_picked, rtol=0, atol=0)
    want = cross_entropy_grad_reference(logits.double(), want_lse, targets, weights)
    got = cross_entropy_grad_(logits.clone(), lse, targets, weights.float())
    assert_grad_within_rounding(got, want, logits, want_lse, weights)
