"""Writing files so that a reader or a crash never sees half of one, with ordinary permissions.

Every file poetx writes (run config, metrics rewrite, checkpoints, tokenizer, token cache,
exports) goes through :func:`atomic_write`: the content is written to a temporary name in the
same folder, fsynced, given the mode an ordinary ``open()`` would give (``0666`` minus the
umask, so an export is readable by a serving account unless the umask says otherwise), then
renamed over the target. Files written by libraries in place (safetensors, ``save_pretrained``)
get the same mode through :func:`set_umask_mode`.

Torch-free, so the command line can use it before heavy imports.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` minus the process's umask."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


def set_umask_mode(path: str | Path) -> None:
    """Give ``path`` the mode of a file created by ``open()`` (libraries such as safetensors
    create their files private, ``0600``)."""
    os.chmod(path, umask_mode())


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A unique sibling name (same folder and suffix) for writing ``path``; it starts with a
    dot and holds ``.tmp-<pid>`` so leftovers of a killed process can be recognized."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. Concurrent writers
    of the same content (ranks building one cache) are safe: each has its own temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        set_umask_mode(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` writes the content to the temporary path; then it replaces ``path``."""
    with atomic_write(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """``obj`` as JSON (sorted keys, trailing newline)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
