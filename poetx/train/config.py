"""``TrainConfig``: every setting of a training run, with per-preset defaults and validation.

Sources, later ones winning: the preset's defaults (``PRESET_DEFAULTS``, the authors' recipe
scaled to the model size), a TOML file (``--config``), then command-line flags. A field left
``None`` is filled from the preset when the config is built, so ``config.json`` of a run always
holds the resolved values that the run used.

A TOML file uses the field names of ``TrainConfig`` and a ``[poet]`` table for ``POETConfig``::

    preset = "llama-60m"
    optimizer = "poetx"
    steps = 10000
    lr = 1e-2
    [poet]
    block_size = 256
    merge_every = 200
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport has the same API
    import tomli as tomllib  # type: ignore[no-redef]

from poetx.config import POETConfig
from poetx.model.llama import PRESETS

OPTIMIZERS = ("poetx", "adamw")
DTYPES = ("auto", "float32", "bfloat16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class PresetDefaults:
    """Recipe of one preset; ``lr_*`` per optimizer, ``poet_lr`` for the rotation parameters."""

    steps: int
    batch_size: int
    seq_len: int
    lr_poetx: float
    poet_lr: float
    lr_adamw: float
    block_size: int
    merge_every: int
    eval_every: int
    save_every: int


# Points the numbers come from (shared/research/poetx.md): the authors' 60M recipe (lr 1e-2 for
# ordinary parameters, poet_lr 2e-3, b = 256, T = 200, 10k steps, no warm-up, cosine to 1%,
# clip 0.1) and their 8B benchmark (b = 512, lr 1e-3, batch 1 x 2048). Sizes in between are
# interpolated on a log scale and untuned. Batch sizes are per step on one GPU (the authors'
# 512 x 256 global batch needs several GPUs). AdamW uses the usual GaLore-style 1e-3 baseline.
# ``tiny`` is sized so that the CPU demo (200 steps) runs in a few minutes on two cores.
PRESET_DEFAULTS: dict[str, PresetDefaults] = {
    "tiny": PresetDefaults(200, 32, 128, 1e-2, 5e-3, 3e-3, 64, 50, 50, 100),
    "llama-60m": PresetDefaults(10_000, 64, 256, 1e-2, 2e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-130m": PresetDefaults(10_000, 64, 256, 5e-3, 2e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-350m": PresetDefaults(10_000, 32, 256, 3e-3, 2e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-1b": PresetDefaults(10_000, 16, 256, 2e-3, 1e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-3b": PresetDefaults(10_000, 4, 1024, 1e-3, 1e-3, 5e-4, 256, 200, 1000, 1000),
    "llama-7b": PresetDefaults(10_000, 1, 2048, 1e-3, 1e-3, 3e-4, 512, 200, 1000, 1000),
    "llama-8b": PresetDefaults(10_000, 1, 2048, 1e-3, 1e-3, 3e-4, 512, 200, 1000, 1000),
    "llama-13b": PresetDefaults(10_000, 1, 2048, 1e-3, 1e-3, 3e-4, 512, 200, 1000, 1000),
}
assert set(PRESET_DEFAULTS) == set(PRESETS)

# Fields that fix the model, the data stream or the optimizer's parameter layout: a resumed run
# must keep them, or its checkpoint would not load or the run would no longer be one run.
RESUME_LOCKED = ("preset", "optimizer", "data", "vocab_size", "seq_len", "batch_size", "seed",
                 "dtype", "init_from")
RESUME_LOCKED_POET = ("block_size", "neumann_terms", "init", "exclude", "seed", "w0_format",
                      "quant_group_size")


@dataclass
class TrainConfig:
    """All settings of one run. ``None`` fields take the preset's default on construction.

    Attributes (model and data):
        preset: model shape, a key of ``poetx.model.llama.PRESETS``.
        optimizer: ``"poetx"`` (rotations by POET-X, ordinary params by AdamW) or ``"adamw"``
            (plain AdamW on the dense model); both run through the same loop.
        data: text file / folder / corpus name for ``poetx.data``; ``None`` = bundled corpus.
        tokenizer: a ``tokenizer.json`` to use instead of training one.
        init_from: a Hugging Face causal-LM folder (``config.json``, weights, ``tokenizer.json``)
            to continue pretraining from: its weights start the run (``poet.init = "keep"``, the
            default then), its tokenizer tokenizes the data unless ``tokenizer`` is given; the
            model's shape is the checkpoint's (``preset`` only picks the recipe's defaults).
            Resume, eval and export of the run read the folder again (the model class).
        vocab_size: size of the tokenizer trained for the run (default: the preset's, 512 for
            ``tiny``); the model's vocabulary is the tokenizer's.
        cache_dir: data cache (default ``$POETX_DATA_DIR`` or ``~/.cache/poetx``).
        seq_len / batch_size: each step trains on ``batch_size`` sequences of ``seq_len`` tokens.
        dtype: ``"auto"`` = bf16 on CUDA, float32 on CPU.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    Optimization:
        steps: optimizer steps; lr: ordinary parameters; poet_lr: rotation parameters (poetx);
        weight_decay; warmup_steps: linear warm-up (default 0 for poetx as the authors, 10% of
        steps for adamw); min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``;
        max_grad_norm: clipping threshold (0 = no clipping); clip_warmup_steps /
        clip_warmup_start: after each merge the threshold ramps from ``start * max_grad_norm``
        back to ``max_grad_norm`` over that many steps.
        skip_nonfinite: skip a step with a NaN/inf loss or gradient instead of stopping.
        grad_checkpointing: HF activation checkpointing of the decoder blocks.
        poet: the reparameterization (block size, merge period ``T``, mode, W0 storage...).
    Bookkeeping:
        eval_every / save_every: period in steps (0 = only at the end); eval_batches: cap on the
        validation batches used (``None`` = all); eval_at_start: evaluate before step 1;
        keep_last: checkpoints kept; out: the run directory (default
        ``runs/<preset>-<optimizer>``); seed; progress (tqdm bar);
        tensorboard (event files when the package is installed).
    """

    preset: str = "tiny"
    optimizer: str = "poetx"
    data: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    vocab_size: int | None = None
    cache_dir: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    steps: int | None = None
    lr: float | None = None
    poet_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.01
    max_grad_norm: float | None = None
    clip_warmup_steps: int | None = None
    clip_warmup_start: float = 0.1
    skip_nonfinite: bool = False
    grad_checkpointing: bool = False
    eval_every: int | None = None
    eval_batches: int | None = None
    eval_at_start: bool = True
    save_every: int | None = None
    keep_last: int = 3
    out: str | None = None
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True
    poet: POETConfig | dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        # Check the two fields that select the defaults before using them.
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        d = PRESET_DEFAULTS[self.preset]
        poetx_run = self.optimizer == "poetx"
        fill = {
            "steps": d.steps,
            "batch_size": d.batch_size,
            "seq_len": d.seq_len,
            "vocab_size": PRESETS[self.preset].vocab,
            "lr": d.lr_poetx if poetx_run else d.lr_adamw,
            "poet_lr": d.poet_lr,
            "max_grad_norm": 0.1 if poetx_run else 1.0,
            "eval_every": d.eval_every,
            "save_every": d.save_every,
            "out": f"runs/{self.preset}-{self.optimizer}",
        }
        for name, value in fill.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.warmup_steps is None:
            # The authors train POET without warm-up; AdamW needs one (10% as in GaLore's runs).
            self.warmup_steps = 0 if poetx_run else max(1, self.steps // 10)
        if not isinstance(self.poet, POETConfig):
            poet = {"block_size": d.block_size, "merge_every": d.merge_every, "seed": self.seed}
            if self.init_from is not None:
                poet["init"] = "keep"  # continued pretraining starts from the trained weights
            if self.poet is not None:
                if not isinstance(self.poet, dict):
                    raise ValueError(f"poet: must be a table of POET settings, got {self.poet!r}")
                poet.update(self.poet)
            self.poet = POETConfig.from_dict(poet)
        if self.clip_warmup_steps is None:
            self.clip_warmup_steps = max(1, self.poet.merge_every // 10) if poetx_run else 0
        self.validate()

    # validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value."""
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not DEVICE_RE.match(self.device):
            raise ValueError(
                f"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        for name in ("data", "tokenizer", "cache_dir", "init_from"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: must be a non-empty path string, got {value!r}")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out: must be a non-empty path string, got {self.out!r}")
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("seq_len", self.seq_len, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("steps", self.steps, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps: must not exceed steps ({self.steps}), got {self.warmup_steps}"
            )
        _check_int("clip_warmup_steps", self.clip_warmup_steps, 0)
        _check_int("eval_every", self.eval_every, 0)
        if self.eval_batches is not None:
            _check_int("eval_batches", self.eval_batches, 1)
        _check_int("save_every", self.save_every, 0)
        _check_int("keep_last", self.keep_last, 1)
        _check_int("seed", self.seed, 0)
        _check_float("lr", self.lr, positive=True)
        _check_float("poet_lr", self.poet_lr, positive=True)
        _check_float("weight_decay", self.weight_decay)
        _check_float("max_grad_norm", self.max_grad_norm)
        _check_float("min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _check_float("clip_warmup_start", self.clip_warmup_start, positive=True)
        if self.clip_warmup_start > 1:
            raise ValueError(f"clip_warmup_start: must be in (0, 1], got {self.clip_warmup_start}")
        for name in ("skip_nonfinite", "grad_checkpointing", "eval_at_start", "progress",
                     "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        self.poet.validate()
        if self.init_from is not None and self.optimizer == "poetx" and self.poet.init != "keep":
            raise ValueError(
                f"poet.init: must be 'keep' with init_from (the checkpoint's weights become W0), "
                f"got {self.poet.init!r}"
            )

    # conversion -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready dict (``poet`` nested)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "poet"}
        d["poet"] = self.poet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict such as ``to_dict()`` output; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a table of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        d = dict(d)
        if isinstance(d.get("poet"), dict):
            d["poet"] = dict(d["poet"])
        return cls(**d)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a plain dict (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: invalid TOML: {e}") from None


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; the nested ``poet`` table is merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if key == "poet" and isinstance(value, dict) and isinstance(out.get("poet"), dict):
            out["poet"] = {**out["poet"], **value}
        else:
            out[key] = value
    return out


def build_config(config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset defaults < TOML file < ``overrides`` (the flags that were given)."""
    settings: dict[str, Any] = {}
    source = "flags"
    if config_file is not None:
        settings = load_toml(config_file)
        source = f"config file {config_file}"
        if "poet" in settings and not isinstance(settings["poet"], dict):
            raise ValueError(f"{source}: 'poet' must be a table ([poet])")
    return TrainConfig.from_dict(merge_settings(settings, overrides or {}), source=source)


def resume_config(saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The config of a resumed run: the saved one updated by ``overrides``.

    Settings that would change the model, the data stream or the optimizer layout
    (``RESUME_LOCKED``) must match the saved run; others (steps, eval/save periods, lr...) may
    change, e.g. to extend a run.
    """
    saved_cfg = TrainConfig.from_dict(saved, source="saved config.json")
    for name in RESUME_LOCKED:
        if name in overrides and overrides[name] != getattr(saved_cfg, name):
            raise ValueError(
                f"{name}: cannot change on --resume (run has {getattr(saved_cfg, name)!r}, "
                f"got {overrides[name]!r}); start a new run with another --out instead"
            )
    for name in RESUME_LOCKED_POET:
        new = (overrides.get("poet") or {}).get(name)
        old = getattr(saved_cfg.poet, name)
        if new is not None and new != old:
            raise ValueError(
                f"poet.{name}: cannot change on --resume (run has {old!r}, got {new!r})"
            )
    return TrainConfig.from_dict(merge_settings(saved_cfg.to_dict(), overrides),
                                 source="resumed config")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: must be at least {low}, got {value}")


def _check_float(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name}: must be a finite {kind} number, got {value}")
