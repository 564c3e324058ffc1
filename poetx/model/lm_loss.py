"""Cross-entropy of a causal LM head computed in chunks, never holding full float32 logits
nor a float32 gradient of the head.

For a vocabulary of 128k and 1024 tokens the logits alone are 0.5 GB in float32 (and as much
again for their gradient); here only about ``chunk_tokens x vocab`` of them exist at any time.
Forward runs over chunks of tokens and keeps each token's log-sum-exp (float32, one number per
token). Backward runs over chunks of the *vocabulary*: each chunk of head rows gets its whole
gradient from one GEMM over all tokens (float32 accumulation inside the GEMM, one rounding to
the head's dtype), written straight into the head gradient. Accumulating over token chunks
instead would need a float32 head gradient (``V x d x 4`` bytes, 2 GiB at Llama-8B) and a
conversion copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.model.causal_attention import unmasked_causal_attention
from poetx.model.loss_chunks import auto_chunk_tokens, vocab_chunk


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # The count stays on the device: reading it would stall the host every step.
        count = (targets >= 0).sum().clamp_min(1)  # int64: divides as float32 below
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start : start + chunk] = chunk_lse
            valid = t >= 0
            picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            total += ((chunk_lse - picked) * valid).sum()
            del logits, chunk_lse, picked
        ctx.save_for_backward(hidden, weight, targets, count, lse)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, count, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_out.float() / count
        n, vocab = hidden.shape[0], weight.shape[0]
        step = vocab_chunk(ctx.chunk, vocab, n)
        valid = (targets >= 0).unsqueeze(1)
        weights = (valid * scale).to(torch.float32)  # (N, 1): 0 for ignored tokens
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_hidden = (torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                       if need_hidden else None)
        for v0 in range(0, vocab, step):
            w = weight[v0 : v0 + step]
            probs = (hidden @ w.t()).float()
            probs.sub_(lse.unsqueeze(1)).exp_()
            # Boolean indexing would sync on the number of selected rows; scatter and mask do not.
            local = targets - v0
            inside = valid & ((local >= 0) & (local < w.shape[0])).unsqueeze(1)
            probs.scatter_add_(1, local.clamp(0, w.shape[0] - 1).unsqueeze(1),
                               -inside.to(probs.dtype))
            probs.mul_(weights)
            grad_logits = probs.to(hidden.dtype)
            del probs
            if grad_weight is not None:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[v0 : v0 + step])
            if grad_hidden is not None:
                _accumulate_product_(grad_hidden, grad_logits, w)
            del grad_logits
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None


def _accumulate_product_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc``. On CUDA with 16-bit ``a``, ``b`` one cuBLAS
    GEMM with 16-bit inputs and float32 output (``out_dtype``); upcasting them first runs a
    float32 GEMM (about twice as slow on H200)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = 1024
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``.

    Args:
        hidden: ``(N, H)`` final hidden states; weight: ``(V, H)`` output embedding;
        targets: ``(N,)`` token ids, ``-100`` ignored.
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


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
