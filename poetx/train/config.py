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

Fields are declared with :func:`poetx.settings.setting` (default, help, check, ``--help``
group): adding a field to ``TrainConfig`` or ``POETConfig`` is all it takes to get a validated
setting, a ``poetx train`` flag (:mod:`poetx.cli.flags`) and a TOML / ``config.json`` key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poetx.config import POETConfig
from poetx.model.presets import PRESETS, preset_names
from poetx.settings import (
    at_least,
    in_interval,
    matches,
    non_empty,
    non_negative,
    positive,
    reject_unknown,
    setting,
    validate_fields,
)

OPTIMIZERS = ("poetx", "adamw")
# poetx.optim.dense_update.DENSE_OPTIMIZERS (named here: this module does not import torch)
DENSE_OPTIMIZERS = ("adamw", "adamw-kahan", "adamw-fp32-master", "adamw8bit")
ROTATION_STATES = ("fp32", "8bit")
# The memory options are off by default: torch's fused AdamW is the only step a CUDA graph
# captures (what makes small models fast), and the options are not yet tested under DDP or
# FSDP2. Measured on an H200 (bench/results/memory_options.json, Llama-8B 1 x 1024): -4.6 GiB at
# 0.97x-1.00x tokens/s; the fit check of `poetx train` names them when a run needs them.
PARALLEL = ("auto", "none", "ddp", "fsdp")
# Keys of config.json computed for the reader (world size, global batch); ignored on load.
DERIVED_KEY = "derived"
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
# Rotation lr convention (README, "Rotation size and W0's spectrum"): the authors' poet_lr times
# their scale 0.5 (Adam eps 1e-6 in make_optimizer), times 256 / b above b = 256 (a block's
# ||Q|| grows with b at a given per-entry step); tiny keeps 0.5 x its former 5e-3. Measured on
# tiny (bench/results/fidelity.json): largest block ||Q||_2 0.52 instead of 0.86 in the first
# 100 steps; the ||Q|| guard (max_q_norm) merges early where it still grows too far.
PRESET_DEFAULTS: dict[str, PresetDefaults] = {
    "tiny": PresetDefaults(200, 32, 128, 1e-2, 2.5e-3, 3e-3, 64, 50, 50, 100),
    "llama-60m": PresetDefaults(10_000, 64, 256, 1e-2, 1e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-130m": PresetDefaults(10_000, 64, 256, 5e-3, 1e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-350m": PresetDefaults(10_000, 32, 256, 3e-3, 1e-3, 1e-3, 256, 200, 1000, 1000),
    "llama-1b": PresetDefaults(10_000, 16, 256, 2e-3, 5e-4, 1e-3, 256, 200, 1000, 1000),
    "llama-3b": PresetDefaults(10_000, 4, 1024, 1e-3, 5e-4, 5e-4, 256, 200, 1000, 1000),
    "llama-7b": PresetDefaults(10_000, 1, 2048, 1e-3, 2.5e-4, 3e-4, 512, 200, 1000, 1000),
    "llama-8b": PresetDefaults(10_000, 1, 2048, 1e-3, 2.5e-4, 3e-4, 512, 200, 1000, 1000),
    "llama-13b": PresetDefaults(10_000, 1, 2048, 1e-3, 2.5e-4, 3e-4, 512, 200, 1000, 1000),
    "llama-30b": PresetDefaults(10_000, 1, 2048, 1e-4, 2.5e-4, 1e-4, 512, 200, 1000, 1000),
}
assert set(PRESET_DEFAULTS) == set(PRESETS)

# Fields that fix the model, the data stream or the optimizer's parameter layout: a resumed run
# must keep them, or its checkpoint would not load or the run would no longer be one run.
# ``batch_size`` is not locked: the *global* batch (batch x grad_accum x processes) is, checked
# when the checkpoint is loaded, so a run can resume on another number of GPUs.
RESUME_LOCKED = ("preset", "optimizer", "data", "vocab_size", "seq_len", "seed", "dtype",
                 "init_from", "dense_optimizer", "rotation_states")
RESUME_LOCKED_POET = ("block_size", "neumann_terms", "init", "exclude", "seed", "w0_format",
                      "quant_group_size", "w0_residual", "mlp_permutations")


@dataclass(frozen=True)
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
        seq_len / batch_size: each micro-batch holds ``batch_size`` sequences of ``seq_len``
            tokens, per process.
        grad_accum: micro-batches per optimizer step and process (gradients accumulate; under
            ddp they are all-reduced once, after the last). The global batch is
            ``batch_size x grad_accum x processes`` sequences.
        parallel: ``auto`` (none in one process; under ``torchrun`` with several: ``ddp`` when
            the planner's estimate of one replica fits the GPU, else ``fsdp``), ``none``,
            ``ddp`` (replicas, one gradient all-reduce per step, CUDA-graph step), ``fsdp``
            (FSDP2: parameters sharded, see ``poetx.train.fsdp``).
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
        cuda_graphs: replay the step as one CUDA graph (``poetx.train.capture``) where it
            applies: a CUDA device and a single process; ignored elsewhere.
        compile_blocks: ``torch.compile`` the code between the POET layers of each decoder
            block (``poetx.model.compile_blocks``) when the step is a CUDA graph (compiled
            pieces with graph breaks cost host time per call, paid once at capture); not
            under ``grad_checkpointing``, whose ``torch.utils.checkpoint`` disables dynamo.
    Memory (``poetx plan`` predicts each option's effect):
        grad_checkpointing: HF activation checkpointing of the decoder blocks.
        dense_optimizer: update of embedding, lm_head and norms (``poetx.optim.dense_update``):
            ``adamw`` (bf16 states; the only one a CUDA graph can capture), ``adamw-kahan``
            (+ a bf16 compensation buffer, small updates kept), ``adamw-fp32-master``
            (+ a float32 master copy), ``adamw8bit`` (torchao 8-bit states and stochastic
            rounding for embedding and lm_head, Kahan for norms).
        rotation_states: ``fp32`` Adam states of the rotations, or ``8bit`` (torchao; needs
            ``dense_optimizer = "adamw8bit"``).
        step_in_backward: step embedding and lm_head inside backward, as soon as each gradient
            is written, then free it (``poetx.optim.in_backward``); they are clipped each on
            its own at ``max_grad_norm``. Needs ``grad_accum = 1`` and one process.
        fit_check: refuse, before allocating, a CUDA run that the planner predicts will not
            fit (the error names a setting that fits); gpu_mem: the memory (GiB) to plan
            against instead of the device's (also on a CPU run, e.g. to check a plan).
        poet: the reparameterization (block size, merge period ``T``, mode, W0 storage...).
    Bookkeeping:
        eval_every / save_every: period in steps (0 = only at the end); eval_batches: cap on the
        validation batches used (``None`` = all); eval_at_start: evaluate before step 1;
        metrics_every: steps whose metrics are read from the device together (one wait for
            the device each time; a NaN is reported naming its step up to that many steps
            later; every step still gets its row);
        keep_last: checkpoints kept; out: the run directory (default
        ``runs/<preset>-<optimizer>``); seed; progress (tqdm bar);
        tensorboard (event files when the package is installed).
    """

    preset: str = setting("tiny", "model shape", choices=preset_names, group="run")
    optimizer: str = setting("poetx", "poetx (rotations) or adamw (dense baseline)",
                             choices=OPTIMIZERS, group="run")
    data: str | None = setting(
        None, "text/jsonl/token file or folder, or hf:NAME (default: bundled corpus)",
        check=non_empty, group="data", metavar="PATH")
    tokenizer: str | None = setting(None, "tokenizer.json to use instead of training one",
                                    check=non_empty, group="data", metavar="PATH")
    init_from: str | None = setting(
        None, "continue pretraining a Hugging Face causal LM folder: its weights (POET init "
        "'keep') and its tokenizer.json", check=non_empty, group="data", metavar="HF_DIR")
    vocab_size: int | None = setting(
        None, "vocabulary of the tokenizer trained for the run (default: the preset's)",
        check=at_least(2), group="data")
    cache_dir: str | None = setting(None, "data cache (default $POETX_DATA_DIR or "
                                    "~/.cache/poetx)", check=non_empty, group="data",
                                    metavar="DIR")
    seq_len: int | None = setting(
        None, "tokens per sequence (default: the preset's)",
        check=at_least(2), group="data")
    batch_size: int | None = setting(
        None, "sequences per micro-batch and process (default: the preset's)",
        check=at_least(1), group="data")
    grad_accum: int = setting(
        1, "micro-batches per step (global batch = batch x grad-accum x processes)",
        check=at_least(1), group="data parallel (under torchrun --nproc-per-node N)")
    parallel: str = setting(
        "auto", "auto (none with one process; with several: ddp when one replica fits the "
        "GPU by the planner's estimate, else fsdp), none, ddp (replicas), fsdp (FSDP2 shards)",
        choices=PARALLEL,
        group="data parallel (under torchrun --nproc-per-node N)")
    dtype: str = setting("auto", "auto = bf16 on CUDA, float32 on CPU", choices=DTYPES,
                         group="run")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N",
                          check=matches(DEVICE_RE.pattern, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
                          metavar="DEVICE",
                          group="run")
    steps: int | None = setting(
        None, "optimizer steps (default: the preset's)", check=at_least(1),
        group="optimization")
    lr: float | None = setting(
        None, "learning rate of ordinary parameters (default: the preset's)",
        check=positive, group="optimization")
    poet_lr: float | None = setting(
        None, "learning rate of the rotations (default: the preset's)",
        check=positive, group="optimization")
    weight_decay: float = setting(0.0, "AdamW weight decay", check=non_negative,
                                  group="optimization")
    warmup_steps: int | None = setting(
        None, "linear warm-up steps (default 0 for poetx, 10% of steps for adamw)",
        check=at_least(0), group="optimization")
    min_lr_ratio: float = setting(0.01, "cosine floor as a fraction of lr",
                                  check=in_interval(0, 1), group="optimization")
    max_grad_norm: float | None = setting(
        None, "gradient clipping threshold, 0 = off (default 0.1 for poetx, 1.0 for adamw)",
        check=non_negative, group="optimization")
    clip_warmup_steps: int | None = setting(
        None, "steps to ramp the clipping threshold back up after a merge (default T/10)",
        check=at_least(0), group="optimization")
    clip_warmup_start: float = setting(
        0.1, "clipping threshold right after a merge, as a fraction of --max-grad-norm",
        check=in_interval(0, 1, open_low=True), group="optimization")
    skip_nonfinite: bool = setting(
        False, "skip steps with NaN/inf loss or gradient instead of stopping",
        group="optimization")
    cuda_graphs: bool = setting(
        True, "record the training step as one CUDA graph after 3 eager steps and replay it "
        "(CUDA, one process; off: every step eager)", group="optimization")
    compile_blocks: bool = setting(
        True, "torch.compile the code between the POET layers of each decoder block (norms, "
        "rotary, SwiGLU, residuals) where the step is a CUDA graph and not checkpointed",
        group="optimization")
    grad_checkpointing: bool = setting(False, "activation checkpointing of the decoder blocks",
                                       group="memory")
    dense_optimizer: str = setting(
        "adamw", "update of embedding, lm_head and norms: adamw (bf16 states), adamw-kahan, "
        "adamw-fp32-master, adamw8bit (torchao 8-bit states for embedding and lm_head)",
        choices=DENSE_OPTIMIZERS, group="memory")
    rotation_states: str = setting(
        "fp32", "Adam states of the rotations: fp32, or 8bit (with --dense-optimizer adamw8bit)",
        choices=ROTATION_STATES, group="memory")
    step_in_backward: bool = setting(
        False, "step embedding and lm_head inside backward (each clipped on its own), so "
        "their gradients never coexist with the others (one process, grad accum 1)",
        group="memory")
    fit_check: bool = setting(
        True, "refuse a run that the memory planner predicts will not fit on the device",
        group="memory")
    gpu_mem: float | None = setting(
        None, "device memory in GiB for the fit check (default: the device's free memory)",
        check=positive, group="memory", metavar="GIB")
    eval_every: int | None = setting(
        None, "evaluate every N steps, 0 = only at the end (default: the preset's)",
        check=at_least(0), group="logging and checkpoints")
    eval_batches: int | None = setting(None, "validation batches to use (default: all)",
                                       check=at_least(1), group="logging and checkpoints")
    eval_at_start: bool = setting(True, "evaluate before the first step",
                                  group="logging and checkpoints")
    save_every: int | None = setting(
        None, "checkpoint every N steps, 0 = only at the end (default: the preset's)",
        check=at_least(0), group="logging and checkpoints")
    metrics_every: int = setting(
        10, "read the step metrics from the device every N steps (one wait each time)",
        check=at_least(1), group="logging and checkpoints")
    keep_last: int = setting(3, "checkpoints to keep", check=at_least(1),
                             group="logging and checkpoints")
    out: str | None = setting(None, "run directory (default runs/<preset>-<optimizer>)",
                              check=non_empty, group="run", metavar="RUN_DIR")
    seed: int = setting(0, "seed of model init, data order and rotations", check=at_least(0),
                        group="run")
    progress: bool = setting(True, "progress bar", group="logging and checkpoints")
    tensorboard: bool = setting(True, "TensorBoard event files (when tensorboard is "
                                "installed)", group="logging and checkpoints")
    poet: POETConfig | dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        # Check the two fields that select the defaults before using them.
        validate_fields(self, ("preset", "optimizer"))
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
                object.__setattr__(self, name, value)
        validate_fields(self, ("steps",))
        if self.warmup_steps is None:
            # The authors train POET without warm-up; AdamW needs one (10% as in GaLore's runs).
            object.__setattr__(self, "warmup_steps",
                               0 if poetx_run else max(1, self.steps // 10))
        if not isinstance(self.poet, POETConfig):
            poet = {"block_size": d.block_size, "merge_every": d.merge_every, "seed": self.seed}
            if self.init_from is not None:
                poet["init"] = "keep"  # continued pretraining starts from the trained weights
            if self.poet is not None:
                if not isinstance(self.poet, dict):
                    raise ValueError(f"poet: must be a table of POET settings, got {self.poet!r}")
                poet.update(self.poet)
            object.__setattr__(self, "poet", POETConfig.from_dict(poet, source="poet"))
        if self.clip_warmup_steps is None:
            object.__setattr__(self, "clip_warmup_steps",
                               max(1, self.poet.merge_every // 10) if poetx_run else 0)
        self.validate()

    # validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value."""
        validate_fields(self)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps: must not exceed steps ({self.steps}), got {self.warmup_steps}"
            )
        self.poet.validate()
        if self.rotation_states == "8bit" and self.dense_optimizer != "adamw8bit":
            raise ValueError("rotation_states: '8bit' needs dense_optimizer 'adamw8bit' "
                             f"(torchao), got dense_optimizer {self.dense_optimizer!r}")
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
        d = {k: v for k, v in d.items() if k != DERIVED_KEY}
        reject_unknown(cls, d, source)
        if isinstance(d.get("poet"), dict):
            d["poet"] = dict(d["poet"])
        return cls(**d)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one process's step (``batch_size x grad_accum x seq_len``)."""
        return self.batch_size * self.grad_accum * self.seq_len


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
