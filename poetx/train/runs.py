"""Opening runs: device and dtype resolution, the model of a run, a run's checkpoint on disk.

Shared by the training loop and the ``eval`` / ``export`` / ``plot`` commands, so that all of
them build exactly the same model for a given config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaForCausalLM

import poetx
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.llama import build_model, default_dtype, llama_config
from poetx.train.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    latest_checkpoint,
    load_model_state,
    read_state,
    verify_checkpoint,
)
from poetx.train.config import TrainConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available on this machine")
    if (device.type == "cuda" and device.index is not None
            and device.index >= torch.cuda.device_count()):
            raise ValueError(
                f"device: {name!r} requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bf16 on CUDA and float32 elsewhere."""
    return default_dtype(device) if name == "auto" else _DTYPES[name]


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


def enable_grad_checkpointing(model: nn.Module) -> None:
    """HF activation checkpointing of every decoder block (non-reentrant: it works with the
    POET custom op and with frozen ``W0``). transformers 5 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def grad_checkpointing_on(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_vocab_size(checkpoint: Path) -> int:
    """Rows of the input embedding stored in a checkpoint (the model's vocabulary)."""
    fpath = checkpoint / MODEL_FILE
    name = "model.embed_tokens.weight"
    with safe_open(str(fpath), framework="pt", device="cpu") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        key = aliases.get(name, name)
        if key not in set(f.keys()):
            raise CheckpointError(f"{fpath} has no {name!r}: not a Llama checkpoint of poetx")
        return int(f.get_slice(key).get_shape()[0])


@dataclass
class LoadedRun:
    """A run's model restored from one of its checkpoints (for eval / export / plot)."""

    run_dir: Path
    checkpoint: Path
    config: TrainConfig
    state: dict[str, Any]
    model: nn.Module
    device: torch.device


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint`` if given, else the newest checkpoint of ``run_dir`` (errors name paths)."""
    run_dir = Path(run_dir)
    if checkpoint is not None:
        return Path(checkpoint)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    if path is None:
        raise CheckpointError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}")
    return path


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             dtype: str | None = None) -> LoadedRun:
    """Build the run's model and load a verified checkpoint into it (eval mode).

    ``dtype`` defaults to the run's own (bf16 for a GPU run, also on CPU) so that the loaded
    weights are exactly the trained ones.
    """
    path = find_checkpoint(run_dir, checkpoint)
    verify_checkpoint(path)
    state = read_state(path)
    cfg = TrainConfig.from_dict(state["config"], source=f"{path}/state.json config")
    dev = resolve_device(device)
    saved_dtype = state.get("dtype") or cfg.dtype
    torch_dtype = resolve_dtype(dtype or saved_dtype, dev)
    torch.manual_seed(cfg.seed)
    # A continued-pretraining run takes its vocabulary (and architecture) from init_from.
    vocab = 0 if cfg.init_from is not None else checkpoint_vocab_size(path)
    model = build_run_model(cfg, vocab, dev, torch_dtype)
    load_model_state(path, model)
    model.eval()
    return LoadedRun(Path(run_dir), path, cfg, state, model, dev)
