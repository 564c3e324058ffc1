"""Debian binary packages (``.deb``) as a source of files: fetch one by name, read its files.

A ``.deb`` is an ``ar`` archive whose ``data.tar.{xz,gz,bz2}`` member holds the installed tree;
it is read here without ``dpkg``, so the files of a downloaded package can be read on any
machine. Fetching goes through ``apt-get download NAME=VERSION`` (the ordinary client, with the
machine's configured Debian sources) and checks the file's sha256 against a pinned value. A
version that has left the index (a security update superseded by the next one) is usually still
in the mirror's pool, beside the current version's file: that is where it is looked for next.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from poetx.data.cache import sha256_file

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60


class PackageUnavailableError(RuntimeError):
    """A pinned package could not be fetched, or what was fetched does not match its pin."""


@dataclass(frozen=True)
class DebPin:
    """One Debian binary package at an exact version and content hash."""

    name: str
    version: str
    sha256: str

    @property
    def file_name(self) -> str:
        """The name ``apt-get download`` gives the file (``:`` of an epoch as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"

    @property
    def pool_name(self) -> str:
        """The file's name in a mirror's pool (no epoch)."""
        return f"{self.name}_{self.version.split(':', 1)[-1]}_all.deb"


def fetch_deb(pin: DebPin, downloads: Path) -> Path:
    """Return ``downloads/<file>`` with the pinned sha256, running ``apt-get download`` if needed.

    A verified file already there is used without network, so copying the ``.deb`` files into
    ``downloads`` installs offline.

    Raises:
        PackageUnavailableError: apt-get is missing or failed (no Debian sources, registry
            unreachable, version no longer served), or the download's sha256 is not the pin.
    """
    target = downloads / pin.file_name
    if target.is_file() and sha256_file(target) == pin.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    apt = shutil.which("apt-get")
    if apt is None:
        raise PackageUnavailableError(
            f"{pin.name}={pin.version}: apt-get is not installed, so Debian packages cannot be "
            f"fetched here; copy {pin.file_name} (sha256 {pin.sha256}) into {downloads}"
        )
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".apt-") as tmp:
        os.chmod(tmp, 0o777)  # apt drops to the _apt user to write the file when it can
        cmd = [apt, "download", "-q", f"{pin.name}={pin.version}"]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PackageUnavailableError(f"{pin.name}={pin.version}: {exc}") from exc
        found = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(found) != 1:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
            pooled = _fetch_from_pool(apt, pin, Path(tmp))
            if pooled is None:
                raise PackageUnavailableError(
                    f"apt-get could not download {pin.name}={pin.version} (exit "
                    f"{proc.returncode}):\n{tail}\nnor is {pin.pool_name} in the pool folder of "
                    f"the version the index serves. Run `apt-get update` once; if the version "
                    f"is gone, its pin in poetx/data/debian_en.py must be updated (new version "
                    f"and sha256)."
                )
            found = [pooled]
        digest = sha256_file(found[0])
        if digest != pin.sha256:
            raise PackageUnavailableError(
                f"{pin.name}={pin.version}: the download's sha256 {digest} is not the pinned "
                f"{pin.sha256}"
            )
        os.replace(found[0], target)
    return target


def pool_candidates(print_uris: str, pin: DebPin) -> list[str]:
    """URLs where ``pin``'s file may be, from ``apt-get download --print-uris NAME`` output (the
    version the index serves now): its pool folder on each archive that output names, and the
    same folder on the other of ``debian`` / ``debian-security`` (point releases move security
    updates into the main archive)."""
    folders: list[str] = []
    for line in print_uris.splitlines():
        if not line.startswith("'"):
            continue
        url = line.split("'")[1]
        folder = url.rsplit("/", 1)[0] + "/"
        swaps = (("/debian-security/pool/updates/", "/debian/pool/"),
                 ("/debian/pool/", "/debian-security/pool/updates/"))
        for candidate in (folder, *(folder.replace(a, b) for a, b in swaps if a in folder)):
            if candidate not in folders:
                folders.append(candidate)
    return [f + urllib.parse.quote(pin.pool_name) for f in folders]


def _fetch_from_pool(apt: str, pin: DebPin, folder: Path) -> Path | None:
    """Download ``pin``'s file from a pool folder (see :func:`pool_candidates`) into ``folder``;
    None where no candidate has it. The caller checks the sha256."""
    try:
        proc = subprocess.run([apt, "download", "--print-uris", "-q", pin.name], cwd=folder,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    target = folder / pin.file_name
    for url in pool_candidates(proc.stdout, pin):
        try:
            with urllib.request.urlopen(url, timeout=300) as response:
                target.write_bytes(response.read())
            return target
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return None


def _ar_members(data: bytes, path: Path) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(_AR_MAGIC):
        raise ValueError(f"{path}: not a Debian package (no ar header)")
    pos = len(_AR_MAGIC)
    while pos + _AR_HEADER <= len(data):
        header = data[pos : pos + _AR_HEADER]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ValueError(f"{path}: corrupt ar header at byte {pos}") from None
        start = pos + _AR_HEADER
        if start + size > len(data):
            raise ValueError(f"{path}: truncated ar member {name!r}")
        yield name, data[start : start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned


def _decompress(name: str, payload: bytes, path: Path) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(payload)
    if name.endswith(".gz"):
        return gzip.decompress(payload)
    if name.endswith(".bz2"):
        return bz2.decompress(payload)
    if name.endswith(".tar"):
        return payload
    raise ValueError(f"{path}: unsupported compression of {name} (xz, gz, bz2 are read)")


def deb_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(path, content)`` of every regular file the package installs, in archive order.

    Paths are absolute-style (``/usr/share/doc/...``). Symbolic links and folders are skipped.

    Raises:
        ValueError: not a ``.deb``, a corrupt archive, or no ``data.tar.*`` member.
    """
    path = Path(path)
    for name, payload in _ar_members(path.read_bytes(), path):
        if not name.startswith("data.tar"):
            continue
        try:
            tar_bytes = _decompress(name, payload, path)
            with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    source = archive.extractfile(member)
                    assert source is not None  # a regular file always has a payload
                    yield "/" + member.name.lstrip("./"), source.read()
        except (tarfile.TarError, lzma.LZMAError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt {name}: {exc}") from exc
        return
    raise ValueError(f"{path}: no data.tar member")
