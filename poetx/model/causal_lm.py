"""A causal LM whose forward returns its training loss, so that wrappers see the whole step.

DDP and FSDP hook a module's ``forward``: when the loss reaches into ``model.model`` and
``model.lm_head`` from outside (to avoid full float32 logits), a wrapper around the LM is
bypassed. Wrapping this module instead keeps the memory-lean loss inside the wrapped forward.
"""

from __future__ import annotations

from torch import Tensor, nn

from poetx.model.lm_loss import lm_loss


class CausalLMWithLoss(nn.Module):
    """``forward(input_ids, labels)`` is the mean next-token cross-entropy, a float32 scalar.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``), kept as ``self.model`` so that
            the state dict of this module is ``model.*`` of the LM's.
        chunk_tokens: see :func:`poetx.model.lm_loss.lm_loss` (``0`` = sized from the
            vocabulary, ``None`` = full logits).
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """input_ids, labels: ``(B, L)`` (labels shifted by one, ``-100`` ignored) -> ``()``."""
        return lm_loss(self.model, input_ids, labels, self.chunk_tokens)
