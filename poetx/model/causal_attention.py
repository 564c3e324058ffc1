"""Causal attention without a mask for the unpadded token batches poetx trains on.

Given no attention mask, a Hugging Face model lets SDPA apply causality itself (``is_causal``,
the flash / cuDNN kernels), unless it thinks it is being traced: transformers 5.17 counts a CUDA
graph being captured as tracing and then builds an explicit ``(B, 1, L, L)`` mask. So a captured
training step ran masked attention (another, slower kernel; the eager warm-up steps did not),
and a compiled decoder block saw a mask at capture that its warm-up never saw, which made dynamo
recompile inside the capture. :func:`unmasked_causal_attention` runs the model's forward with
an attention implementation that is SDPA itself but registered without a mask builder, so HF
passes no mask in every mode and SDPA attends causally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

CAUSAL_SDPA = "poetx_causal_sdpa"
_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        # No entry in transformers' mask functions: create_causal_mask returns None for it.
        AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
        _registered = True


def _windowed(config) -> bool:
    """Whether some layer attends within a sliding window (a mask SDPA's ``is_causal`` does
    not express): those models keep HF's masks."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return True
    return any("sliding" in str(kind) for kind in getattr(config, "layer_types", None) or ())


@contextlib.contextmanager
def unmasked_causal_attention(model: nn.Module) -> Iterator[None]:
    """While inside, a Hugging Face model configured for ``"sdpa"`` attends causally with no
    mask tensor (for batches without padding; the only inputs poetx's losses take). Other
    implementations, and models with sliding-window layers, are left as they are. The
    implementation is a private config attribute that ``save_pretrained`` does not write."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or _windowed(config):
        yield
        return
    _register()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
