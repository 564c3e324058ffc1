"""A two-layer Llama small enough for float64 CPU tests of whole-model POET wiring, and the
loss/gradient read-out those tests compare between a model and its twin."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from poetx import POETConfig
from poetx.model.wrap import poet_layers

VOCAB = 61

# The layer paths a whole-model test should cover: both modes, batched builds and fan-outs on
# and off (in the combinations that differ in what the op computes on).
LAYER_SETTINGS = [
    dict(mode="fast", batch_rotations="on", shared_inputs="on"),
    dict(mode="fast", batch_rotations="off", shared_inputs="off"),
    dict(mode="mem", batch_rotations="off", shared_inputs="off"),
    dict(mode="mem", batch_rotations="on", shared_inputs="on"),
]


def settings_id(settings: dict) -> str:
    return "-".join(str(v) for v in settings.values())


def hf_config(intermediate: int = 160) -> LlamaConfig:
    """Hidden 64, 4 heads (2 KV), MLP width ``intermediate`` (150 leaves a padded block of 32)."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       use_cache=False, tie_word_embeddings=False)


def wrapped_llama(config: POETConfig, intermediate: int = 160, theta_std: float = 0.05,
                  dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.nn.Module:
    """The tiny Llama in ``dtype`` on ``device``, wrapped with ``config``; skew parameters drawn
    from N(0, theta_std) so the rotations are far from identity (zero skews would hide
    permutation mistakes)."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(hf_config(intermediate)).to(device=device, dtype=dtype)
    model = poetx.wrap(dense, config)
    with torch.no_grad():
        for _, layer in poet_layers(model):
            layer.theta_in.normal_(0, theta_std)
            layer.theta_out.normal_(0, theta_std)
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits, loss, {parameter name: gradient})`` of one forward/backward on ``ids``
    ``(batch, seq)`` as labels too."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads



def assert_twin_matches(model: torch.nn.Module, twin: torch.nn.Module, ids: torch.Tensor,
                        steps: int = 1) -> torch.Tensor:
    """``steps`` forward/backward passes of ``model`` and of ``twin`` (the same weights computed
    another way) give the same logits, loss and gradients; returns the last logits.

    Float64 models must agree to float64 rounding. Float32 (CUDA) models to float32 rounding:
    the Gram kernels' split-token sums add in another order, and Triton's exp-based sigmoid
    is not torch's."""
    float64 = next(model.parameters()).dtype == torch.float64
    logits_tol, loss_rtol, grad_tol = ((1e-12, 1e-12, (1e-11, 1e-13)) if float64
                                       else (1e-5, 1e-5, (1e-4, 1e-6)))
    for _ in range(steps):
        logits, loss, grads = loss_and_grads(model, ids)
        ref_logits, ref_loss, ref_grads = loss_and_grads(twin, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=logits_tol, atol=logits_tol)
        torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            rtol, atol = grad_tol
            torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=name)
    return logits
