"""``poetx export``: a run's checkpoint as a plain Hugging Face model folder.

The rotations are merged into dense weights (``poetx.unwrap``: ``W = R W0 P``), so the folder
loads with ``AutoModelForCausalLM.from_pretrained`` on a machine without poetx.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import poetx
from poetx.atomic import set_umask_mode, write_json_atomic
from poetx.train.run_dir import TOKENIZER_FILE
from poetx.train.run_model import grad_checkpointing_on
from poetx.train.saved_run import load_run

EXPORT_INFO_FILE = "poetx_export.json"


def export_run(run_dir: str | Path, dest: str | Path, checkpoint: str | Path | None = None,
               dtype: str | None = None, force: bool = False) -> Path:
    """Write ``DEST/{config.json, model.safetensors, tokenizer.json, ...}``; returns ``DEST``.

    ``dtype`` defaults to the run's training dtype. The tokenizer is the run's
    ``tokenizer.json`` (absent for pre-tokenized data without a tokenizer: then only the model
    is written, with a note in ``poetx_export.json``).
    """
    run_dir = Path(run_dir)
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"export destination {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise FileExistsError(f"export destination {dest} is not empty (pass --force to write "
                              f"into it)")
    run = load_run(run_dir, checkpoint, device="cpu", dtype=dtype, action="export")
    model = run.model
    if run.config.optimizer == "poetx":
        poetx.unwrap(model)
    if grad_checkpointing_on(model):
        disable = getattr(model, "activation_checkpointing_disable", None) or \
            model.gradient_checkpointing_disable
        disable()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it

    tok = None
    tok_path = run_dir / TOKENIZER_FILE
    if tok_path.is_file():
        from poetx.data.tokenizer import EOT, load_tokenizer

        tok = load_tokenizer(tok_path)
        eot = tok.token_to_id(EOT)
        # The documents were separated by <|endoftext|>: it is both the start and end marker.
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.bos_token_id = eot
                cfg.eos_token_id = eot

    dest.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(dest, **kwargs)
    if tok is not None:
        from poetx.data.tokenizer import to_hf_tokenizer

        to_hf_tokenizer(tok).save_pretrained(dest)
    info = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.state["step"],
        "optimizer": run.config.optimizer,
        "preset": run.config.preset,
        "tokenizer": tok is not None,
    }
    write_json_atomic(dest / EXPORT_INFO_FILE, info)
    # save_pretrained writes the weights private (0600, by safetensors); an export is meant to
    # be read by other accounts (serving), so every file gets the mode of an ordinary file.
    for path in dest.rglob("*"):
        if path.is_file():
            set_umask_mode(path)
    return dest
