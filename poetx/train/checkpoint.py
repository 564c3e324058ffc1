"""Checkpoints: one folder per step, written atomically, verified by a manifest on load.

Layout of ``RUN_DIR/checkpoints/step_00000300/``::

    model.safetensors      model.state_dict() (W0, skew parameters, permutations, merge counters,
                           ordinary weights); a tensor shared by several names (tied embeddings)
                           is stored once, the other names listed as aliases in the metadata
    optimizer.safetensors  optimizer state tensors under "state.<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states, numpy's key array
    state.json             step, run config, data position, lr scheduler, merge schedule,
                           optimizer param groups, python / numpy RNG scalars
    manifest.json          size and sha256 of each file above; written last

No tensor is ever pickled. A save goes to ``step_X.tmp-<pid>/``; every file is fsynced, the
manifest written last, then the folder is renamed into place, so a crash leaves either the old
set of checkpoints or the new one, never a half-written ``step_X``. A failed save removes its
temporary folder and touches no other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

FORMAT = "poetx-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^step_\d{8,}\.(tmp|old)-(\d+)$")
_HASH_CHUNK = 1 << 22


class CheckpointError(Exception):
    """A checkpoint cannot be written or used; the message names the file and the problem."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the finished checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# saving -----------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cpu_contiguous(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def dedup_tensors(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Split ``state`` into tensors to store and ``alias -> stored name`` for shared ones.

    safetensors refuses two names on one storage (tied embeddings). Names that are the very
    same view of a storage become aliases of the first name; a partial overlap is copied.
    """
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device and cannot be saved")
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in views:
            aliases[name] = views[key]
            continue
        if t.numel() > 0:
            views[key] = name
            if ptr in storages:
                t = t.clone()  # another view of a stored storage: store this one separately
            storages.add(ptr)
        stored[name] = _cpu_contiguous(t)
    return stored, aliases


def _rng_tensors_and_meta() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n_cuda):
        tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "cuda_devices": n_cuda,
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def _json_value(value: Any) -> Any:
    # A learning rate kept as a device tensor (for a captured step) is saved as its number.
    if torch.is_tensor(value):
        return value.item()
    return list(value) if isinstance(value, tuple) else value


def _optimizer_tensors_and_meta(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    values: dict[str, Any] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = _cpu_contiguous(value)
            else:
                values[f"{idx}.{key}"] = value
    groups = [{k: _json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "values": values}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` atomically; returns its folder.

    ``state`` holds the JSON-safe rest (config, data position, schedules). With ``keep_last``,
    older checkpoints beyond the newest ``keep_last`` are deleted, only after this one is in
    place. On any failure the temporary folder is removed and ``CheckpointError`` raised (a
    ``KeyboardInterrupt`` is re-raised after the clean-up).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model_tensors, aliases = dedup_tensors(model.state_dict())
        save_file(model_tensors, str(tmp / MODEL_FILE),
                  metadata={"format": FORMAT, "aliases": json.dumps(aliases)})
        opt_tensors, opt_meta = _optimizer_tensors_and_meta(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": FORMAT})
        rng_tensors, rng_meta = _rng_tensors_and_meta()
        save_file(rng_tensors, str(tmp / RNG_FILE), metadata={"format": FORMAT})
        for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE):
            _fsync_file(tmp / name)
        full_state = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            **state,
            "optimizer": opt_meta,
            "rng": rng_meta,
            "versions": {"torch": torch.__version__},
        }
        _write_json(tmp / STATE_FILE, full_state)
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _file_digest(tmp / name)}
                 for name in REQUIRED_FILES}
        _write_json(tmp / MANIFEST_FILE,
                    {"format": FORMAT, "version": VERSION, "step": step, "files": files})
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (e.g. interrupted again right after resuming): swap, then drop.
            old = root / f"{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(
                f"saving checkpoint {final} failed ({type(e).__name__}: {e}); "
                f"earlier checkpoints are untouched"
            ) from e
        raise
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoint folders; returns the deleted ones."""
    if keep_last < 1:
        raise ValueError(f"keep_last: must be at least 1, got {keep_last}")
    found = list_checkpoints(root)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temporary folders left by saves of processes that no longer run.

    A ``.old-<pid>`` folder whose final name is missing is put back (the swap was interrupted
    between its two renames).
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        final = root / p.name.split(".", 1)[0]
        if m.group(1) == "old" and not final.exists():
            os.rename(p, final)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# loading ----------------------------------------------------------------------------------------
def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of the checkpoint against its manifest; returns the manifest.

    Raises ``CheckpointError`` naming the file: missing, truncated (size differs) or corrupt
    (sha256 differs), and a missing or unreadable manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path} is missing: the checkpoint is incomplete (its save did not "
            f"finish) or was not written by poetx"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a poetx checkpoint manifest")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e}") from None
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{manifest_path} does not list {name}")
    for name, info in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing (listed in {MANIFEST_FILE})")
        size = fpath.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{fpath} is truncated or was modified: {size} bytes, the manifest says "
                f"{info['size']}"
            )
        digest = _file_digest(fpath)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"{fpath} is corrupt: its sha256 {digest[:16]}... does not match the "
                f"manifest's {info['sha256'][:16]}..."
            )
    return manifest


def read_state(path: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint (not verified; call ``verify_checkpoint`` first)."""
    fpath = Path(path) / STATE_FILE
    try:
        state = json.loads(fpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{fpath} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{fpath} is not valid JSON: {e}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{fpath} is not a poetx checkpoint state")
    return state


def _open(fpath: Path) -> Iterator:
    try:
        return safe_open(str(fpath), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{fpath} cannot be read as safetensors: {e}") from None


def read_tensors(fpath: str | Path, names: list[str] | None = None) -> dict[str, Tensor]:
    """Tensors of a safetensors file (all, or ``names``; model aliases resolved), on CPU."""
    fpath = Path(fpath)
    with _open(fpath) as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        keys = set(f.keys())
        wanted = list(keys) + list(aliases) if names is None else names
        out = {}
        for name in wanted:
            source = aliases.get(name, name)
            if source not in keys:
                raise CheckpointError(f"{fpath} has no tensor {name!r}")
            out[name] = f.get_tensor(source)
    return out


def load_model_state(path: str | Path, model: nn.Module) -> None:
    """Copy the checkpoint's ``model.safetensors`` into ``model`` (any device, float dtypes
    converted). Missing / unexpected tensors and shape or kind mismatches raise
    ``CheckpointError`` naming the tensor."""
    fpath = Path(path) / MODEL_FILE
    target = model.state_dict()
    with _open(fpath) as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        stored = set(f.keys())
        available = stored | set(aliases)
        missing = sorted(set(target) - available)
        unexpected = sorted(available - set(target))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensors {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected tensors {_short(unexpected)}")
            raise CheckpointError(
                f"{fpath} does not match the model ({'; '.join(parts)}): was it written for "
                f"another preset, optimizer or POET setting?"
            )
        for name, dest in target.items():
            src_name = aliases.get(name, name)
            src_slice = f.get_slice(src_name)
            shape = tuple(src_slice.get_shape())
            if shape != tuple(dest.shape):
                raise CheckpointError(
                    f"{fpath}: tensor {name!r} has shape {shape}, the model expects "
                    f"{tuple(dest.shape)} (another preset, vocabulary or block size?)"
                )
            src = f.get_tensor(src_name)
            if src.dtype.is_floating_point != dest.dtype.is_floating_point:
                raise CheckpointError(
                    f"{fpath}: tensor {name!r} is {src.dtype}, the model expects {dest.dtype} "
                    f"(another w0_format?)"
                )
            with torch.no_grad():
                dest.copy_(src)


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Restore ``optimizer`` from ``optimizer.safetensors`` and the groups in ``state``."""
    fpath = Path(path) / OPTIMIZER_FILE
    meta = state["optimizer"]
    groups = meta["param_groups"]
    current = optimizer.param_groups
    if len(groups) != len(current) or any(
        len(g["params"]) != len(c["params"]) or g.get("name") != c.get("name")
        for g, c in zip(groups, current, strict=True)
    ):
        raise CheckpointError(
            f"{fpath}: optimizer parameter groups differ from this run's "
            f"({[(g.get('name'), len(g['params'])) for g in groups]} vs "
            f"{[(c.get('name'), len(c['params'])) for c in current]})"
        )
    params = [p for g in current for p in g["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in read_tensors(fpath).items():
        _, idx, name = key.split(".", 2)
        i = int(idx)
        if name in ("exp_avg", "exp_avg_sq") and tuple(tensor.shape) != tuple(params[i].shape):
            raise CheckpointError(
                f"{fpath}: optimizer state {key!r} has shape {tuple(tensor.shape)}, the "
                f"parameter has {tuple(params[i].shape)}"
            )
        per_param.setdefault(i, {})[name] = tensor
    for key, value in meta.get("values", {}).items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    restored_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                       for g in groups]
    optimizer.load_state_dict({"state": per_param, "param_groups": restored_groups})


def restore_rng(path: str | Path, state: dict[str, Any]) -> None:
    """Put back the torch / CUDA / numpy / python generators saved with the checkpoint."""
    tensors = read_tensors(Path(path) / RNG_FILE)
    meta = state["rng"]
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(meta["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
    np_meta = meta["numpy"]
    np.random.set_state((np_meta["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         np_meta["pos"], np_meta["has_gauss"], np_meta["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def resolve_resume(root: str | Path, requested: str | Path | None = None) -> Path:
    """The checkpoint folder to resume from: ``requested``, else the newest under ``root``.

    It is verified; a corrupt newest checkpoint is an error (never silently skipped: it may hide
    a disk problem, and resuming from an older step silently repeats work).
    """
    if requested is not None:
        path = Path(requested)
        what = "checkpoint"
    else:
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"no checkpoint to resume from in {root}")
        what = "newest checkpoint"
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        older = [p for _, p in list_checkpoints(root) if p != path]
        hint = (f"; move it aside to resume from {older[-1].name}, or pass --resume "
                f"{older[-1]}") if older and requested is None else ""
        raise CheckpointError(f"cannot resume: {what} {path} is unusable: {e}{hint}") from None
    return path
