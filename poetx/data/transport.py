"""Packing a corpus's tokens small for a machine without network, and unpacking them there.

``poetx data pack debian-en --out DIR --train-tokens N`` writes into ``DIR``:

* ``tokens`` format (default): ``train.u16.bin.xz`` (the first whole documents of the training
  stream, at most ``N`` tokens) and ``val.u16.bin.xz`` (the whole validation stream);
* ``text`` format: ``train.jsonl.xz`` / ``val.jsonl.xz``, the same documents as text, to be
  tokenized on arrival;

plus ``tokenizer.json`` and ``pack.json`` (format, token counts, sha256 of the token files the
unpacking must reproduce). ``poetx data unpack DIR`` turns either into ``train.u16.bin`` and
``val.u16.bin`` beside them, checks their sha256, and leaves ``DIR`` a ``--data`` folder (token
files + tokenizer). The training stream of the corpus is in a shuffled document order
(:mod:`poetx.data.debian_en`), so its prefix mixes every source.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from poetx.atomic import write_json_atomic, write_with
from poetx.data.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer

PACK_FILE = "pack.json"
FORMATS = ("tokens", "text")
_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_SPLITS = ("train", "val")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["id"], row["text"]


def whole_document_prefix(ids: np.ndarray, max_tokens: int, separator: int) -> int:
    """Length of the longest prefix of ``ids`` of at most ``max_tokens`` that ends a document
    (with its ``separator``); the whole stream when it is short enough."""
    if len(ids) <= max_tokens:
        return len(ids)
    ends = np.flatnonzero(np.asarray(ids[:max_tokens]) == separator)
    if len(ends) == 0:
        raise ValueError(f"no whole document fits in {max_tokens} tokens")
    return int(ends[-1]) + 1


def pack(corpus: Path, out: Path, train_tokens: int, fmt: str = "tokens") -> dict:
    """Pack the corpus folder ``corpus`` (``tokens/``, ``text/``, ``tokenizer.json``) into
    ``out``; returns the ``pack.json`` content (sizes, counts, seconds)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if train_tokens < 1:
        raise ValueError(f"train_tokens must be positive, got {train_tokens}")
    tok = load_tokenizer(corpus / TOKENIZER_FILE)
    separator = eot_id(tok)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info: dict = {"format": fmt, "corpus": str(corpus.name), "splits": {}}
    for split in _SPLITS:
        ids = np.fromfile(corpus / "tokens" / f"{split}.u16.bin", dtype="<u2")
        count = whole_document_prefix(ids, train_tokens, separator) if split == "train" \
            else len(ids)
        kept = ids[:count]
        entry = {"tokens": int(count), "documents": int(np.count_nonzero(kept == separator)),
                 "sha256": _sha256_bytes(kept.tobytes())}
        if fmt == "tokens":
            payload = kept.tobytes()
            name = f"{split}.u16.bin.xz"
        else:
            docs = []
            for _, text in _read_jsonl(corpus / "text" / f"{split}.jsonl"):
                if len(docs) == entry["documents"]:
                    break
                docs.append(json.dumps({"text": text}, ensure_ascii=False))
            payload = ("\n".join(docs) + "\n").encode()
            name = f"{split}.jsonl.xz"
        compressed = lzma.compress(payload, format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)
        write_with(out / name, lambda tmp, data=compressed: tmp.write_bytes(data))
        entry.update(file=name, raw_bytes=len(payload), packed_bytes=len(compressed))
        info["splits"][split] = entry
    write_with(out / TOKENIZER_FILE, lambda tmp: tmp.write_bytes(
        (corpus / TOKENIZER_FILE).read_bytes()))
    info["packed_bytes"] = sum(e["packed_bytes"] for e in info["splits"].values()) + \
        (out / TOKENIZER_FILE).stat().st_size
    info["pack_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / PACK_FILE, info)
    return info


def unpack(folder: Path) -> dict:
    """Turn a packed folder into ``train.u16.bin`` / ``val.u16.bin`` (checked against the
    sha256 in ``pack.json``); already unpacked files that check out are kept. Returns the
    seconds each step took.

    Raises:
        FileNotFoundError: no ``pack.json`` (not a packed folder).
        ValueError: an unpacked stream's sha256 differs from the pack's (corrupt or wrong
            tokenizer).
    """
    pack_file = folder / PACK_FILE
    if not pack_file.is_file():
        raise FileNotFoundError(f"{folder} is not a packed corpus (no {PACK_FILE})")
    info = json.loads(pack_file.read_text())
    timings: dict[str, float] = {}
    tok = None
    for split in _SPLITS:
        entry = info["splits"][split]
        target = folder / f"{split}.u16.bin"
        if target.is_file() and _sha256_bytes(target.read_bytes()) == entry["sha256"]:
            continue
        start = time.perf_counter()
        raw = lzma.decompress((folder / entry["file"]).read_bytes())
        if info["format"] == "tokens":
            ids = np.frombuffer(raw, dtype="<u2")
        else:
            from poetx.data.dataset import tokenize_documents  # needs tokenizers and torch

            tok = tok or load_tokenizer(folder / TOKENIZER_FILE)
            # split on "\n" only: json.dumps leaves U+2028 and other line breaks in strings
            texts = [json.loads(line)["text"] for line in raw.decode().split("\n") if line]
            ids = tokenize_documents(texts, tok).astype("<u2")
        digest = _sha256_bytes(ids.tobytes())
        if digest != entry["sha256"]:
            raise ValueError(
                f"{folder / entry['file']}: unpacked {split} tokens have sha256 {digest}, the "
                f"pack says {entry['sha256']} (corrupt file, or another tokenizer)"
            )
        write_with(target, lambda tmp, data=ids: data.tofile(tmp))
        timings[split] = round(time.perf_counter() - start, 2)
    os.utime(folder)
    return timings
