"""Will a run fit on a GPU? Refuse one that cannot, before anything is allocated.

Intended call site: the trainer, after the ``TrainConfig`` is resolved and the device chosen,
before the model is built (today ``poetx/train/loop.py`` right after ``resolve_device``; in the
coming ``Trainer``, first thing in its constructor)::

    from poetx.plan.fit import check_fits
    check_fits(cfg, device)   # raises ValueError naming a setting that fits
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from poetx.plan.memory import (
    GIB,
    MemoryPlan,
    Setting,
    plan,
    standard_settings,
)


def setting_of(cfg: Any) -> Setting:
    """The :class:`Setting` of a ``TrainConfig`` (read by attribute; nothing imported)."""
    poet = cfg.poet
    return Setting(
        optimizer=cfg.optimizer,
        mode=poet.mode,
        checkpointing=bool(cfg.grad_checkpointing),
        w0_format=poet.w0_format,
        block_size=poet.block_size,
        quant_group_size=poet.quant_group_size,
        dense_optimizer=getattr(cfg, "dense_optimizer", "adamw"),
        rotation_states=getattr(cfg, "rotation_states", "fp32"),
        step_in_backward=bool(getattr(cfg, "step_in_backward", False)),
        w0_residual=poet.w0_residual,
        # the Trainer captures only torch's fused AdamW (CUDA, one process)
        cuda_graphs=bool(getattr(cfg, "cuda_graphs", False))
        and getattr(cfg, "dense_optimizer", "adamw") == "adamw"
        and getattr(cfg, "rotation_states", "fp32") == "fp32",
        grad_accum=getattr(cfg, "grad_accum", 1),
        compile_blocks=bool(getattr(cfg, "compile_blocks", False)),
        permuted_saves=getattr(poet, "permuted_saves", "auto"),
        mlp_permutations=getattr(poet, "mlp_permutations", "independent"),
        mlp_frames=getattr(poet, "mlp_frames", "fused"),
    )


def flags_of(setting: Setting) -> str:
    """``poetx train`` flags that select ``setting``."""
    if setting.optimizer == "adamw":
        flags = ["--optimizer adamw"]
    else:
        flags = ["--optimizer poetx", f"--mode {setting.mode}",
                 f"--w0-format {setting.w0_format}", f"--block-size {setting.block_size}"]
    flags.append("--grad-checkpointing" if setting.checkpointing else "--no-grad-checkpointing")
    # explicit: their defaults depend on the preset
    flags.append(f"--dense-optimizer {setting.dense_optimizer}")
    flags.append("--step-in-backward" if setting.step_in_backward else "--no-step-in-backward")
    if setting.rotation_states != "fp32":
        flags.append(f"--rotation-states {setting.rotation_states}")
    if setting.optimizer == "poetx" and setting.w0_residual != "host":
        flags.append(f"--w0-residual {setting.w0_residual}")
    if not setting.cuda_graphs and setting.dense_optimizer == "adamw":
        flags.append("--no-cuda-graphs")
    if setting.cuda_graphs and setting.optimizer == "poetx" and not setting.compile_blocks:
        flags.append("--no-compile-blocks")
    if setting.grad_accum > 1:
        flags.append(f"--grad-accum {setting.grad_accum}")
    return " ".join(flags)


def device_budget(device: Any) -> int | None:
    """Bytes this process may allocate on ``device``: the free memory, capped by
    ``torch.cuda.set_per_process_memory_fraction``; ``None`` for a non-CUDA device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    cap = total
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        cap = int(total * get_fraction(index))
    return min(free + torch.cuda.memory_reserved(index), cap)


def fitting_settings(preset: str, seq_len: int, batch_size: int, budget: int,
                     current: Setting, vocab_size: int | None = None,
                     dtype_bytes: int = 2, step_in_backward: bool = True) -> list[MemoryPlan]:
    """Settings whose requirement fits ``budget`` bytes, largest peak first (the largest that
    fits usually trades the least speed): the standard ones at the current block size and
    dense-parameter optimizer, and the current one with checkpointing. ``step_in_backward``:
    whether the lean settings may step embedding and head inside backward (not with gradient
    accumulation or several processes, where the Trainer refuses it)."""
    keep = {"dense_optimizer": current.dense_optimizer, "rotation_states":
            current.rotation_states, "step_in_backward": current.step_in_backward,
            "w0_residual": current.w0_residual, "cuda_graphs": current.cuda_graphs,
            "grad_accum": current.grad_accum, "compile_blocks": current.compile_blocks}
    candidates = [replace(s, **keep) for s in standard_settings((current.block_size,))
                  if s.dense_optimizer == "adamw" and not s.step_in_backward]
    candidates.append(replace(current, checkpointing=True))
    # the memory options, on the current setting and on the leanest one
    bases = (current, replace(current, checkpointing=True, mode="mem"),
             replace(current, checkpointing=True, mode="mem", w0_format="int8"))
    step_in_backward = step_in_backward and current.grad_accum == 1
    lean = [replace(s, dense_optimizer="adamw8bit", step_in_backward=step_in_backward,
                    cuda_graphs=False,
                    rotation_states=r)
            for s in bases for r in ("fp32", "8bit")] if current.optimizer == "poetx" else []
    candidates += lean
    seen, plans = set(), []
    for s in candidates:
        if s in seen:
            continue
        seen.add(s)
        p = plan(preset, seq_len, batch_size, s, vocab_size, dtype_bytes)
        if p.required_bytes() <= budget:
            plans.append(p)
    return sorted(plans, key=lambda p: -p.peak_bytes)


def fits_replicated(cfg: Any, device: Any) -> bool | None:
    """Whether one full replica of the run of ``cfg`` (weights, optimizer state, activations
    of one micro-batch) fits on ``device``: what ``--parallel auto`` asks to choose ``ddp``
    (yes) or ``fsdp`` (no). ``None`` where nothing can be said (CPU, a preset the planner
    does not know)."""
    gpu_mem = getattr(cfg, "gpu_mem", None)  # --gpu-mem overrides the device's memory
    budget = device_budget(device) if gpu_mem is None else int(gpu_mem * GIB)
    if budget is None:
        return None
    dtype_bytes = 4 if getattr(cfg, "dtype", "auto") == "float32" else 2
    try:
        mine = plan(cfg.preset, cfg.seq_len, cfg.batch_size, setting_of(cfg), cfg.vocab_size,
                    dtype_bytes)
    except (KeyError, ValueError):
        return None
    return mine.required_bytes() <= budget


def check_fits(cfg: Any, device: Any, budget_bytes: int | None = None,
               distributed: bool = False) -> MemoryPlan | None:
    """Raise ``ValueError`` when the run of ``cfg`` (a ``TrainConfig``) cannot fit on ``device``.

    ``budget_bytes`` overrides the device's (see :func:`device_budget`); ``distributed``: the
    run has several processes (then, as with gradient accumulation, no suggestion steps in
    backward, which the Trainer would refuse). Returns the plan of the
    run, or ``None`` when there is nothing to check (CPU, or a float32 run). The error names the
    predicted need, the budget and a setting that fits (or a smaller batch that does).
    """
    budget = device_budget(device) if budget_bytes is None else budget_bytes
    if budget is None:
        return None
    dtype = getattr(cfg, "dtype", "auto")
    dtype_bytes = 4 if dtype == "float32" else 2
    current = setting_of(cfg)
    mine = plan(cfg.preset, cfg.seq_len, cfg.batch_size, current, cfg.vocab_size, dtype_bytes)
    if mine.required_bytes() <= budget:
        return mine
    what = (f"{cfg.preset}, batch {cfg.batch_size} x seq {cfg.seq_len}, {current.name}: "
            f"predicted peak {mine.peak_gib:.1f} GiB ({mine.required_bytes() / GIB:.1f} GiB with "
            f"CUDA context and allocator margin), but {device} has {budget / GIB:.1f} GiB")
    in_backward_ok = getattr(cfg, "grad_accum", 1) == 1 and not distributed
    fits = fitting_settings(cfg.preset, cfg.seq_len, cfg.batch_size, budget, current,
                            cfg.vocab_size, dtype_bytes, in_backward_ok)
    if fits:
        best = fits[0]
        raise ValueError(f"{what}; this fits: {flags_of(best.setting)} "
                         f"(predicted {best.peak_gib:.1f} GiB); see `poetx plan`")
    batch = cfg.batch_size // 2
    while batch >= 1:
        smaller = fitting_settings(cfg.preset, cfg.seq_len, batch, budget, current,
                                   cfg.vocab_size, dtype_bytes, in_backward_ok)
        if smaller:
            raise ValueError(f"{what}; no setting fits at this batch size; "
                             f"--batch-size {batch} {flags_of(smaller[0].setting)} does "
                             f"(predicted {smaller[0].peak_gib:.1f} GiB)")
        batch //= 2
    raise ValueError(f"{what}; no setting fits even at batch size 1; see `poetx plan`")
