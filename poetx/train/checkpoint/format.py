"""The checkpoint format: file names, the manifest, reading and verifying files.

``manifest.json`` lists size and sha256 of every other file; it is written last, so a folder
without it is an unfinished save. Every error names the file and the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from poetx.data.cache import sha256_file

FORMAT = "poetx-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
# A sharded (FSDP2) checkpoint: model and optimizer tensors in a torch.distributed.checkpoint
# folder (one ``__<rank>_0.distcp`` file per process and the ``.metadata`` index).
SHARDED_DIR = "sharded"
SHARDED_METADATA = f"{SHARDED_DIR}/.metadata"
SHARDED_REQUIRED_FILES = (SHARDED_METADATA, RNG_FILE, STATE_FILE)
NAME_RE = re.compile(r"^step_(\d{8,})$")


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
        m = NAME_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint folder ``path`` holds sharded (torch.distributed.checkpoint)
    model and optimizer state rather than ``model.safetensors`` / ``optimizer.safetensors``."""
    return (Path(path) / SHARDED_DIR).is_dir()


def _written_files(folder: Path) -> list[str]:
    """What a save wrote into ``folder`` (relative paths): the one-process files, or the
    sharded folder's files (every process's) with the RNG and state files."""
    if not is_sharded(folder):
        return list(REQUIRED_FILES)
    shards = sorted(f"{SHARDED_DIR}/{p.name}" for p in (folder / SHARDED_DIR).iterdir()
                    if p.is_file())
    return shards + [RNG_FILE, STATE_FILE]


def manifest_of(folder: Path, step: int) -> dict[str, Any]:
    """The manifest of the files written in ``folder``."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in _written_files(folder)}
    layout = "sharded" if is_sharded(folder) else "full"
    return {"format": FORMAT, "version": VERSION, "step": step, "layout": layout,
            "files": files}


def open_safetensors(fpath: Path):
    """``safe_open`` whose failures (not a safetensors file, unreadable) name the file."""
    try:
        return safe_open(str(fpath), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{fpath} cannot be read as safetensors: {e}") from None


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of the checkpoint against its manifest; returns the manifest.

    Raises ``CheckpointError`` naming the file: missing, truncated (size differs), corrupt
    (sha256 differs) or not a safetensors file (a manifest made for a foreign file), and a
    missing or unreadable manifest. A sharded checkpoint's manifest lists every process's
    shard file, so a missing or damaged shard is named too.
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
    required = (SHARDED_REQUIRED_FILES if manifest.get("layout") == "sharded"
                else REQUIRED_FILES)
    for name in required:
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
        digest = sha256_file(fpath)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"{fpath} is corrupt: its sha256 {digest[:16]}... does not match the "
                f"manifest's {info['sha256'][:16]}..."
            )
        if name.endswith(".safetensors"):
            with open_safetensors(fpath):  # reads the header only
                pass
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


def aliases_of(f: Any) -> dict[str, str]:
    """``alias -> stored name`` of an open model file (tied tensors are stored once)."""
    return json.loads((f.metadata() or {}).get("aliases", "{}"))


def read_tensors(fpath: str | Path, names: list[str] | None = None) -> dict[str, Tensor]:
    """Tensors of a safetensors file (all, or ``names``; model aliases resolved), on CPU."""
    fpath = Path(fpath)
    with open_safetensors(fpath) as f:
        aliases = aliases_of(f)
        keys = set(f.keys())
        wanted = list(keys) + list(aliases) if names is None else names
        out = {}
        for name in wanted:
            source = aliases.get(name, name)
            if source not in keys:
                raise CheckpointError(f"{fpath} has no tensor {name!r}")
            out[name] = f.get_tensor(source)
    return out


def short_list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
