"""The model of a run: the preset in its dtype on its device, wrapped for poetx runs.

Shared by the training loop and ``eval`` / ``export`` / ``plot``, so all of them build exactly
the same model for a given config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

import poetx
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.llama import build_model, llama_config
from poetx.train.config import TrainConfig


def build_run_model(cfg: TrainConfig, vocab_size: int, device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
    """The model of a run: the preset in ``dtype`` on ``device``, wrapped for poetx runs.

    The wrap comes after the model is in its final dtype and device: ``POETLinear`` then makes
    ``W0`` in that dtype while its skew parameters stay float32 (bf16 cannot hold their small
    updates). Model initialization draws from the global torch RNG: seed it first.
    """
    if cfg.init_from is not None:
        model = load_pretrained(cfg.init_from, vocab_size, device, dtype)
        if cfg.optimizer == "poetx":
            poetx.wrap(model, cfg.poet)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        return model
    max_positions = max(cfg.seq_len, 2048)
    if cfg.optimizer == "poetx" and cfg.poet.init == "normalized":
        # Nothing of the dense linear weights is needed: build on meta and draw W0 in place, so
        # the largest presets never hold a dense copy.
        hf_config = llama_config(cfg.preset, vocab_size, max_positions)
        model = build_poet_model(lambda: LlamaForCausalLM(hf_config), cfg.poet, device, dtype,
                                 init_std=hf_config.initializer_range,
                                 rebuild_buffers=rebuild_hf_rotary)
    else:
        model = build_model(cfg.preset, vocab_size, dtype, device,
                            max_position_embeddings=max_positions)
        if cfg.optimizer == "poetx":
            poetx.wrap(model, cfg.poet)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


def check_pretrained_dir(path: str | Path) -> Path:
    """``path`` if it is a Hugging Face model folder, else ``FileNotFoundError`` naming it."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"init_from: {path} is not a Hugging Face model folder "
                                f"(no config.json)")
    return path


def load_pretrained(path: str | Path, vocab_size: int, device: torch.device,
                    dtype: torch.dtype) -> nn.Module:
    """The Hugging Face causal LM saved in ``path``, in ``dtype`` on ``device``, set up for
    training (no KV cache); its vocabulary must hold every token id (below ``vocab_size``)."""
    from transformers import AutoModelForCausalLM

    path = check_pretrained_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"init_from: cannot load a causal LM from {path}: {e}") from e
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        raise ValueError(f"init_from: the data's tokenizer has {vocab_size} tokens but {path} "
                         f"embeds only {rows}; use the checkpoint's own tokenizer")
    model.config.use_cache = False
    model.config.dtype = dtype
    return model.to(device=device, dtype=dtype)


def has_dropout(model: nn.Module) -> bool:
    """Whether a forward of ``model`` in training mode draws random numbers (dropout)."""
    if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def enable_grad_checkpointing(model: nn.Module) -> None:
    """HF activation checkpointing of every decoder block (non-reentrant: it works with the
    POET custom op and with frozen ``W0``). transformers 5 renamed the method.

    The RNG state is saved for the recomputation only where there is dropout: restoring it
    inside a captured CUDA graph leaves the default CUDA generator unusable outside the graph
    ("Offset increment outside graph capture"), and without dropout there is nothing to
    replay."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": has_dropout(model)}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def grad_checkpointing_on(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
