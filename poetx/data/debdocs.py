"""Documents out of a Debian package: which files are text, in which format, cleaned.

:func:`package_documents` reads a ``.deb`` (:mod:`poetx.data.debian`), keeps the files a
:class:`DocRules` selects, converts each by its format (:mod:`poetx.data.textextract`), drops
the lines the package's pages share, and cuts long texts into documents of bounded size.
"""

from __future__ import annotations

import bz2
import gzip
import re
from dataclasses import dataclass
from pathlib import Path

from poetx.data.debian import deb_files
from poetx.data.textextract import (
    drop_repeated_lines,
    info_to_text,
    letter_fraction,
    markup_to_text,
    pod_to_text,
    split_paragraph_chunks,
    tidy,
)

MIN_DOC_CHARS = 300
MIN_LETTER_FRACTION = 0.6
DEFAULT_CHUNK_CHARS = 40_000

_MARKUP = (".html", ".htm", ".xhtml", ".xml", ".page")
_PLAIN = (".txt", ".rst", ".md", ".text")
# Paths never worth reading: package metadata, search/index pages, copies of sources, assets.
_ALWAYS_EXCLUDED = re.compile(
    r"/changelog|/copyright$|/NEWS(\.|$)|/_sources/|/_static/|/_images/|/_downloads/"
    r"|genindex|/search\.html$|modindex|/objects\.inv$|/searchindex|/index-\w+\.html$"
    # Sphinx and Doxygen pages of program source, Doxygen file lists, man pages
    r"|/_modules/|_source\.html$|-source\.html$|/files\.html$|/globals[_\w]*\.html$"
    r"|/usr/share/man/"
)
# Locale folders of translated manuals; only English ones (and the C locale) are read.
_LANGS = ("af am ar as ast az be bg bn bo br bs ca cs cy da de dz el eo es et eu fa fi fr ga gd "
          "gl gu he hi hr hu hy id is it ja ka kk km kn ko ku lo lt lv mk ml mn mr ms my nb ne "
          "nl nn no oc or pa pl ps pt ro ru si sk sl sq sr sv ta te th tr ug uk ur uz vi wa zh")
_LOCALE_DIR = re.compile(rf"^(?:{'|'.join(_LANGS.split())})(?:[_-][A-Za-z]{{2,4}})?(?:@\w+)?$")


@dataclass(frozen=True)
class DocRules:
    """Which files of a package are read.

    Attributes:
        include: path prefixes (e.g. ``/usr/share/doc/python3.11/html/``); a file is read when
            its path starts with one of them.
        exclude: regular expressions; a path matching one is skipped.
        chunk_chars: longer texts are cut into documents of about this many characters (at
            blank lines), so that one huge file (a dictionary) is not one document.
        fortune: files are ``fortune`` databases (entries separated by ``%`` lines).
    """

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    fortune: bool = False


def _is_foreign_locale(path: str) -> bool:
    return any(_LOCALE_DIR.match(part) for part in path.split("/")[:-1])


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _unpack(path: str, data: bytes) -> tuple[str, bytes]:
    if path.endswith(".gz") or path.endswith(".dz"):  # dictzip is gzip with an index
        return path[:-3], gzip.decompress(data)
    if path.endswith(".bz2"):
        return path[:-4], bz2.decompress(data)
    return path, data


def file_text(path: str, data: bytes, fortune: bool = False) -> str | None:
    """Clean text of one file by its format, or None when the format is not read."""
    path, data = _unpack(path, data)
    name = path.rsplit("/", 1)[-1]
    if fortune:
        entries = re.split(r"^%$", _decode(data), flags=re.MULTILINE)
        return tidy("\n\n".join(entry.strip("\n") for entry in entries if entry.strip()))
    if name.endswith(_MARKUP):
        return markup_to_text(_decode(data))
    if re.search(r"\.info(-\d+)?$", name):
        return info_to_text(_decode(data))
    if name.endswith(".pod"):
        return pod_to_text(_decode(data))
    if name.endswith(_PLAIN) or name.endswith(".dict"):
        return tidy(_decode(data))
    return None


def selected(path: str, rules: DocRules) -> bool:
    """Whether ``rules`` read the file at ``path`` (before looking at its format)."""
    if not path.startswith(rules.include):
        return False
    if _ALWAYS_EXCLUDED.search(path) or _is_foreign_locale(path):
        return False
    return not any(re.search(pattern, path) for pattern in rules.exclude)


def package_documents(deb: Path, rules: DocRules) -> list[tuple[str, str]]:
    """``(doc_id, text)`` of the package's readable files, cleaned, in archive path order.

    ``doc_id`` is the file's path, with ``#k`` for the k-th piece of a long file. Documents
    shorter than ``MIN_DOC_CHARS`` or with fewer than ``MIN_LETTER_FRACTION`` letters among
    their non-space characters (tables, listings of numbers) are dropped.
    """
    files: list[tuple[str, str]] = []
    for path, data in deb_files(deb):
        if not selected(path, rules):
            continue
        text = file_text(path, data, rules.fortune)
        if text:
            files.append((path, text))
    files.sort()
    cleaned = drop_repeated_lines([text for _, text in files])
    docs: list[tuple[str, str]] = []
    for (path, _), text in zip(files, cleaned, strict=True):
        pieces = split_paragraph_chunks(text, rules.chunk_chars)
        for k, piece in enumerate(pieces):
            if len(piece) < MIN_DOC_CHARS or letter_fraction(piece) < MIN_LETTER_FRACTION:
                continue
            docs.append((f"{path}#{k}" if len(pieces) > 1 else path, piece))
    return docs
