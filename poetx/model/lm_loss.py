"""Cross-entropy of a causal LM head without full float32 logits, host syncs or float32
copies of them.

For a vocabulary of 128k and 4096 tokens the logits are 1 GB in bf16 and would be 2 GB more in
float32 (and as much again for their gradient). The loss reads the 16-bit logits through two
kernels (``poetx.kernels.cross_entropy``): forward takes each token's log-sum-exp (float32,
one number per token) and its target's logit, backward writes the logits' gradient over them.

Where a batch's logits fit ``KEEP_LOGITS_BYTES`` (``loss_chunks``), forward computes them in
one GEMM and keeps them; backward turns them into their gradient in place and runs the head's
two backward GEMMs over the whole vocabulary. Larger batches run forward in chunks of tokens
and backward in chunks of the *vocabulary*: each chunk of head rows recomputes its logits,
gets its whole weight gradient from one GEMM over all tokens (float32 accumulation inside the
GEMM, one rounding to the head's dtype), and adds its share of the hidden gradient into a
float32 accumulator. Accumulating the weight gradient over token chunks instead would need a
float32 head gradient (``V x d x 4`` bytes, 2 GiB at Llama-8B) and a conversion copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.kernels.cross_entropy_ref import accumulation_dtype
from poetx.model.causal_attention import unmasked_causal_attention
from poetx.model.loss_chunks import (
    KEEP_LOGITS_BYTES,
    auto_chunk_tokens,
    keeps_logits,
    vocab_chunk,
)
from poetx.ops import backend

# This loss's name in the memory planner (``poetx.plan.memory.LOSSES``), which benchmark rows
# record so that their peaks are checked against the loss they ran.
PLANNER_LOSS = "fused"


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int,
                keep_logits: bool) -> Tensor:
        n = hidden.shape[0]
        valid = targets >= 0
        # The count stays on the device: reading it would stall the host every step.
        count = valid.sum().clamp_min(1)  # int64: divides as float32 below
        if keep_logits:
            logits = hidden @ weight.t()
            lse, picked = backend.logsumexp_pick(logits, targets)
            ctx.save_for_backward(hidden, weight, targets, count, lse, logits)
        else:
            wide = accumulation_dtype(hidden.dtype)
            lse = torch.empty(n, dtype=wide, device=hidden.device)
            picked = torch.empty(n, dtype=wide, device=hidden.device)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                logits = hidden[start:stop] @ weight.t()
                backend.logsumexp_pick(logits, targets[start:stop],
                                       out=(lse[start:stop], picked[start:stop]))
                del logits
            ctx.save_for_backward(hidden, weight, targets, count, lse)
        ctx.chunk = chunk
        ctx.spent = False
        return ((lse - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.spent:
            raise RuntimeError("the chunked cross-entropy's backward ran twice: it writes the "
                               "logits' gradient over the logits it kept, so it cannot be "
                               "retained (retain_graph) for a second backward")
        hidden, weight, targets, count, lse, *kept = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        row_weights = (targets >= 0) * (grad_out.to(lse.dtype) / count)  # 0 for ignored tokens
        if kept:
            ctx.spent = True
            grad_logits = backend.cross_entropy_grad_(kept[0], lse, targets, row_weights)
            grad_weight = grad_logits.t() @ hidden if need_weight else None
            grad_hidden = grad_logits @ weight if need_hidden else None
            return grad_hidden, grad_weight, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        step = vocab_chunk(ctx.chunk, vocab, n)
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_hidden = (torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
                       if need_hidden else None)
        for v0 in range(0, vocab, step):
            w = weight[v0 : v0 + step]
            grad_logits = backend.cross_entropy_grad_(hidden @ w.t(), lse, targets,
                                                      row_weights, v0)
            if grad_weight is not None:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[v0 : v0 + step])
            if grad_hidden is not None:
                _accumulate_product_(grad_hidden, grad_logits, w)
            del grad_logits
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def _accumulate_product_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc``. On CUDA with 16-bit ``a``, ``b`` one cuBLAS
    GEMM with 16-bit inputs and float32 output (``out_dtype``); upcasting them first runs a
    float32 GEMM (about twice as slow on H200)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 1024,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (a float32 scalar;
    float64 for float64 inputs).

    Args:
        hidden: ``(N, H)`` final hidden states; weight: ``(V, H)`` output embedding;
        targets: ``(N,)`` token ids, ``-100`` ignored.
        chunk_tokens: tokens per forward chunk where the logits are not kept.
        keep_logits_bytes: the whole ``(N, V)`` logits are kept for backward (and overwritten
            by their gradient there) where they take at most this many bytes and a gradient
            is wanted; ``0`` always recomputes them in chunks.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "(N, H) and (V, H)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {tuple(targets.shape)}")
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep = wants_grad and keeps_logits(hidden.shape[0], weight.shape[0], hidden.element_size(),
                                       keep_logits_bytes)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_tokens, keep)


def lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor,
            chunk_tokens: int | None = 0) -> Tensor:
    """Mean cross-entropy of a Hugging Face causal LM's predictions for ``labels``.

    Args:
        model: e.g. ``LlamaForCausalLM``; input_ids / labels: ``(B, L)`` (labels already
            shifted, ``-100`` ignored).
        chunk_tokens: through :func:`chunked_cross_entropy` on the base model's hidden states
            (``0``: sized from the vocabulary by :func:`auto_chunk_tokens`); ``None``
            materializes the full logits. No host synchronization either way.
    """
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    plain_head = isinstance(head, nn.Linear) and head.bias is None
    if chunk_tokens is None or base is None or not plain_head:
        with unmasked_causal_attention(model):
            logits = model(input_ids=input_ids).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    # use_cache=False: a training step has no use for the key/value cache HF would fill.
    with unmasked_causal_attention(model):
        hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state
    chunk_tokens = chunk_tokens or auto_chunk_tokens(head.weight.shape[0])
    return chunked_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten(), chunk_tokens)


def causal_lm_loss(model: nn.Module, batch: Tensor, chunk_tokens: int | None = 0) -> Tensor:
    """Next-token loss of a Hugging Face causal LM on ``batch`` ``(B, L+1)`` token ids:
    :func:`lm_loss` of inputs ``batch[:, :-1]`` and targets ``batch[:, 1:]``."""
    return lm_loss(model, batch[:, :-1], batch[:, 1:], chunk_tokens)
