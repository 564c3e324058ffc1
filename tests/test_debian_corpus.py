"""The debian-en corpus code on a fake package built here: no network, no apt-get."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from poetx.cli.main import main
from poetx.data import debian, debian_en
from poetx.data.debdocs import DocRules, file_text, package_documents, selected
from poetx.data.debian import DebPin, PackageUnavailableError, deb_files, fetch_deb
from poetx.data.dedup import deduplicate, normalized_digest
from poetx.data.sources import TokenSource, resolve_source
from poetx.data.textextract import (
    drop_repeated_lines,
    info_to_text,
    markup_to_text,
    pod_to_text,
    split_paragraph_chunks,
)
from poetx.data.tokenizer import EOT, load_tokenizer
from poetx.data.transport import pack, unpack, whole_document_prefix

_SENTENCE = ("the river ran past old stone walls where children played each summer while their "
             "parents talked about harvest weather prices roads bridges letters songs and the "
             "slow turning of seasons over quiet northern hills")
WORDS = _SENTENCE.split(" ")


def prose(seed: int, words: int = 400) -> str:
    """A deterministic paragraph-structured English-like text, different for each seed."""
    rng = np.random.RandomState(seed)
    picked = [WORDS[i] for i in rng.randint(0, len(WORDS), words)]
    sentences = [" ".join(picked[i : i + 12]).capitalize() + "." for i in range(0, words, 12)]
    return "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo("." + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return lzma.compress(buffer.getvalue())


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal Debian binary package holding ``files`` (absolute paths)."""
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                     + _ar_member("control.tar.xz", _tar_xz({}))
                     + _ar_member("data.tar.xz", _tar_xz(files)))
    return path


def _page(title: str, body: str) -> bytes:
    paragraphs = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
    return (f"<html><head><title>{title}</title><script>var x = 1;</script></head><body>"
            f"<nav>Home | Next | Previous</nav><div class='related'>Navigation bar</div>"
            f"<h1>{title}</h1>{paragraphs}<pre>  code   kept</pre></body></html>").encode()


def fake_sources(folder: Path) -> tuple[debian_en.DebSource, ...]:
    """Two fake packages in ``folder``; the second repeats one document of the first."""
    docs_a = {f"/usr/share/doc/alpha/html/page{i}.html": _page(f"Page {i}", prose(i))
              for i in range(30)}
    docs_a["/usr/share/doc/alpha/html/de/page0.html"] = _page("Seite", prose(99))
    docs_a["/usr/share/doc/alpha/changelog.gz"] = b"not read"
    docs_a["/usr/share/doc/alpha/html/_sources/page0.txt"] = prose(0).encode()
    docs_b = {f"/usr/share/info/beta.info-{i}": (
        f"\x1f\nFile: beta.info, Node: N{i}, Next: N{i + 1}\n\n{prose(100 + i)}\n").encode()
        for i in range(12)}
    docs_b["/usr/share/doc/beta/copy.txt"] = prose(3).replace("  ", " ").upper().encode()
    sources = []
    for name, files in (("alpha-doc", docs_a), ("beta-doc", docs_b)):
        pin = DebPin(name, "1.0-1", "0" * 64)
        deb = make_deb(folder / pin.file_name, files)
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        sources.append(debian_en.DebSource(DebPin(name, "1.0-1", digest), "test licence",
                                           DocRules(include=("/usr/share/",))))
    return tuple(sources)


# --- reading packages and files ----------------------------------------------------------------


def test_deb_files_reads_the_data_member(tmp_path: Path) -> None:
    deb = make_deb(tmp_path / "x_1_all.deb", {"/usr/share/doc/x/a.txt": b"hello"})
    assert list(deb_files(deb)) == [("/usr/share/doc/x/a.txt", b"hello")]
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"PK\x03\x04 not a deb")
    with pytest.raises(ValueError, match="not a Debian package"):
        list(deb_files(bad))
    truncated = tmp_path / "cut.deb"
    truncated.write_bytes(deb.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        list(deb_files(truncated))


def test_markup_keeps_visible_text_only() -> None:
    text = markup_to_text(_page("Title", "First para.\n\nSecond para.").decode())
    assert "var x" not in text and "Home | Next" not in text and "Title" in text
    assert "First para.\n\nSecond para." in text
    assert "code   kept" in text  # <pre> keeps its inner spacing


def test_info_pod_and_fortune_formats() -> None:
    info = info_to_text("\x1f\nFile: a.info, Node: Top, Next: B\n\nBody text.\n\x1f\n"
                        "Tag Table:\nNode: Top\x7f12\n")
    assert info == "Body text.\n"
    pod = pod_to_text("=head1 NAME\n\nB<bold> and C<code> and L<perlfunc|perlfunc> E<gt> X<idx>"
                      "\n\n=cut\n")
    assert pod == "NAME\n\nbold and code and perlfunc >\n"
    fortune = file_text("/usr/share/games/fortunes/x", b"One.\n%\nTwo.\n%\n", fortune=True)
    assert fortune == "One.\n\nTwo.\n"
    assert file_text("/usr/share/doc/x/logo.png", b"\x89PNG") is None


def test_selection_skips_translations_metadata_and_sources() -> None:
    rules = DocRules(include=("/usr/share/doc/",), exclude=(r"/skip/",))
    assert selected("/usr/share/doc/x/html/en/intro.html", rules)
    assert selected("/usr/share/doc/x/html/C/intro.html", rules)
    for path in ("/usr/share/doc/x/html/de/intro.html", "/usr/share/doc/x/pt_BR/a.html",
                 "/usr/share/doc/x/changelog.Debian.gz", "/usr/share/doc/x/copyright",
                 "/usr/share/doc/x/_sources/a.txt", "/usr/share/doc/x/_modules/m.html",
                 "/usr/share/doc/x/skip/a.html", "/usr/lib/x/a.html"):
        assert not selected(path, rules), path


def test_repeated_lines_are_dropped_and_long_texts_chunked() -> None:
    docs = [f"Menu\nUnique line {i}\nFooter" for i in range(20)]
    assert drop_repeated_lines(docs, min_docs=8) == [f"Unique line {i}\n" for i in range(20)]
    text = "\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(50))
    chunks = split_paragraph_chunks(text, 500)
    assert len(chunks) > 5 and all(len(c) < 1200 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    lines = "\n".join(f"entry {i} " + "x" * 30 for i in range(200))  # no blank line at all
    assert len(split_paragraph_chunks(lines, 1000)) > 3


def test_package_documents(tmp_path: Path) -> None:
    source = fake_sources(tmp_path)[0]
    docs = package_documents(tmp_path / source.pin.file_name, source.rules)
    ids = [doc_id for doc_id, _ in docs]
    assert len(docs) == 30 and ids == sorted(ids)
    assert all("/de/" not in i and "_sources" not in i and "changelog" not in i for i in ids)
    assert all("Navigation bar" not in text and "Home | Next" not in text for _, text in docs)


# --- de-duplication and split ------------------------------------------------------------------


def test_dedup_removes_exact_and_near_duplicates_only() -> None:
    base = [prose(i, 600) for i in range(6)]
    near = base[1].replace("river", "brook", 1)  # one word changed of 600
    exact = "  " + base[2].upper().replace(".", " .") + "\n"
    texts = [*base, near, exact, prose(50, 600)]
    keep, stats = deduplicate(texts)
    assert keep == [0, 1, 2, 3, 4, 5, 8]
    assert (stats.exact, stats.near, stats.kept) == (1, 1, 7)
    assert deduplicate(texts) == (keep, stats)
    assert normalized_digest("A b, C!") == normalized_digest("a  B C")
    with pytest.raises(ValueError):
        deduplicate(texts, threshold=0)


def test_split_is_by_document_and_deterministic() -> None:
    docs = [(f"pkg:/doc/{i}", prose(i, 20)) for i in range(400)]
    first = debian_en.split_documents(docs, 0.1)
    again = debian_en.split_documents(list(reversed(docs)), 0.1)
    assert first == again
    assert {d for d, _ in first["train"]}.isdisjoint({d for d, _ in first["val"]})
    assert len(first["train"]) + len(first["val"]) == 400
    assert 15 <= len(first["val"]) <= 70


# --- fetching ----------------------------------------------------------------------------------


def test_fetch_uses_a_verified_download_and_checks_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = fake_sources(tmp_path)[0]
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)  # no apt-get needed
    assert fetch_deb(source.pin, tmp_path) == tmp_path / source.pin.file_name
    wrong = DebPin(source.pin.name, source.pin.version, "1" * 64)
    with pytest.raises(PackageUnavailableError, match="apt-get is not installed"):
        fetch_deb(wrong, tmp_path)

    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")

    def fake_apt(cmd, cwd, **kwargs):
        Path(cwd, wrong.file_name).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(debian.subprocess, "run", fake_apt)
    with pytest.raises(PackageUnavailableError, match="is not the pinned"):
        fetch_deb(wrong, tmp_path / "other")

    def failing_apt(cmd, cwd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Version '1.0-1' was not found")

    monkeypatch.setattr(debian.subprocess, "run", failing_apt)
    with pytest.raises(PackageUnavailableError, match="(?s)could not download.*not found"):
        fetch_deb(wrong, tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.deb"))


def test_pool_candidates_from_the_served_version() -> None:
    """Real ``apt-get download --print-uris`` lines (Debian 12, December 2026): the pinned file
    is looked for beside the served one, and in the other archive's pool folder."""
    nginx = DebPin("nginx-doc", "1.22.1-9+deb12u11", "0" * 64)
    line = ("'http://deb.debian.org/debian-security/pool/updates/main/n/nginx/"
            "nginx-doc_1.22.1-9%2bdeb12u12_all.deb' nginx-doc_1.22.1-9+deb12u12_all.deb 90184 "
            "SHA256:8740c4802a2b586b4007f07340e2d1880e79f5394be1938d8686f28eb554e670")
    assert debian.pool_candidates("Reading package lists...\n" + line, nginx) == [
        "http://deb.debian.org/debian-security/pool/updates/main/n/nginx/"
        "nginx-doc_1.22.1-9%2Bdeb12u11_all.deb",
        "http://deb.debian.org/debian/pool/main/n/nginx/nginx-doc_1.22.1-9%2Bdeb12u11_all.deb",
    ]
    bind = DebPin("bind9-doc", "1:9.18.49-1~deb12u2", "0" * 64)  # the epoch is not in the pool
    line = ("'http://deb.debian.org/debian/pool/main/b/bind9/bind9-doc_9.18.49-1%7edeb12u3_all.deb'"
            " bind9-doc_1%3a9.18.49-1~deb12u3_all.deb 3524564 SHA256:7a32")
    assert debian.pool_candidates(line, bind)[0] == (
        "http://deb.debian.org/debian/pool/main/b/bind9/bind9-doc_9.18.49-1~deb12u2_all.deb")
    assert debian.pool_candidates("E: Unable to locate package", bind) == []


def test_fetch_finds_a_version_gone_from_the_index_in_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt-get no longer serves the pinned version; its file is still in the pool folder of the
    served one (a file:// mirror here): fetched from there, checked against the pin."""
    pool = tmp_path / "mirror" / "debian-security" / "pool" / "updates" / "main" / "a" / "alpha"
    pool.mkdir(parents=True)
    source = fake_sources(pool)[0]
    pin = source.pin
    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")
    calls = []

    def apt(cmd, cwd, **kwargs):
        calls.append(cmd)
        if "--print-uris" in cmd:
            url = (pool / f"{pin.name}_1.0-2_all.deb").as_uri()
            return subprocess.CompletedProcess(cmd, 0, f"'{url}' {pin.name}_1.0-2_all.deb 1 "
                                               "SHA256:00\n", "")
        return subprocess.CompletedProcess(cmd, 100, "", f"E: Version '{pin.version}' was not "
                                           "found")

    monkeypatch.setattr(debian.subprocess, "run", apt)
    got = fetch_deb(pin, tmp_path / "downloads")
    assert got == tmp_path / "downloads" / pin.file_name
    assert got.read_bytes() == (pool / pin.file_name).read_bytes()
    assert len(calls) == 2
    # a file in the pool that is not the pinned one is refused
    wrong = DebPin(pin.name, pin.version, "1" * 64)
    with pytest.raises(PackageUnavailableError, match="is not the pinned"):
        fetch_deb(wrong, tmp_path / "other")


# --- the whole build, --data and transport ------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    root = tmp_path_factory.mktemp("debian-en")
    downloads = root / "downloads" / "debian"
    downloads.mkdir(parents=True)
    sources = fake_sources(downloads)
    debian_en.build_corpus(debian_en.corpus_dir(root), downloads, sources,
                           extract_cache=root / "build", workers=1, vocab_size=400,
                           val_fraction=0.25, log=lambda _: None)
    return root, sources


def test_build_corpus_outputs(built: tuple[Path, tuple]) -> None:
    root, _ = built
    folder = debian_en.corpus_dir(root)
    assert (folder / debian_en.MARKER).is_file()
    manifest = json.loads((folder / debian_en.MANIFEST).read_text())
    # beta's copy of alpha's page 3 lacks its title and <pre> line: a near duplicate
    assert manifest["dedup"] == {"documents": 43, "exact": 0, "near": 1}
    assert manifest["sources"]["beta-doc"]["documents"] == 13
    assert manifest["sources"]["beta-doc"]["documents_kept"] == 12
    assert manifest["sources"]["alpha-doc"]["licence"] == "test licence"
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 42
    tok = load_tokenizer(folder)
    for split in ("train", "val"):
        ids = np.fromfile(folder / "tokens" / f"{split}.u16.bin", dtype="<u2")
        assert len(ids) == splits[split]["tokens"]
        rows = [json.loads(line) for line in (folder / "text" / f"{split}.jsonl").open()]
        first_doc = ids[: int(np.argmax(ids == tok.token_to_id(EOT)))]
        assert tok.decode(first_doc.tolist()) == rows[0]["text"]
    # a second build reads every package from the extraction cache
    assert len(list((root / "build").glob("*.jsonl.gz"))) == 2


def test_data_name_resolves_to_the_installed_tokens(
    built: tuple[Path, tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, sources = built
    monkeypatch.setattr(debian_en, "SOURCES", sources)
    source = resolve_source("debian-en", root)
    assert isinstance(source, TokenSource)
    assert source.tokenizer_path == debian_en.corpus_dir(root) / "tokenizer.json"
    assert len(source.tokens("val")) == json.loads(
        (debian_en.corpus_dir(root) / "manifest.json").read_text())["splits"]["val"]["tokens"]


@pytest.mark.parametrize("fmt", ["tokens", "text"])
def test_pack_and_unpack_round_trip(built: tuple[Path, tuple], tmp_path: Path, fmt: str) -> None:
    root, _ = built
    folder = debian_en.corpus_dir(root)
    info = pack(folder, tmp_path / "gpu", train_tokens=3000, fmt=fmt)
    train = np.fromfile(folder / "tokens" / "train.u16.bin", dtype="<u2")
    assert 0 < info["splits"]["train"]["tokens"] <= 3000
    assert unpack(tmp_path / "gpu").keys() == {"train", "val"}
    got = np.fromfile(tmp_path / "gpu" / "train.u16.bin", dtype="<u2")
    assert np.array_equal(got, train[: len(got)]) and got[-1] == 0  # ends with EOT (id 0)
    assert unpack(tmp_path / "gpu") == {}  # already unpacked and checked
    source = resolve_source(str(tmp_path / "gpu"))
    assert isinstance(source, TokenSource) and source.tokenizer_path is not None
    (tmp_path / "gpu" / "val.u16.bin").unlink()
    packed = tmp_path / "gpu" / info["splits"]["val"]["file"]
    raw = lzma.decompress(packed.read_bytes())
    raw = raw.replace(b"river", b"rover", 1) if fmt == "text" else raw[:-3] + b"\x07" + raw[-2:]
    packed.write_bytes(lzma.compress(raw))
    with pytest.raises(ValueError, match="sha256"):
        unpack(tmp_path / "gpu")


def test_text_pack_keeps_unicode_line_separators(built: tuple[Path, tuple],
                                                 tmp_path: Path) -> None:
    from poetx.data.dataset import tokenize_documents

    root, _ = built
    corpus = tmp_path / "corpus"
    (corpus / "tokens").mkdir(parents=True)
    (corpus / "text").mkdir()
    tokenizer = debian_en.corpus_dir(root) / "tokenizer.json"
    (corpus / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    # line breaks that str.splitlines() splits on, left raw inside JSON strings
    docs = ["one a\u2028b\x1cc\x85d", "two\u2029e"]
    for split in ("train", "val"):
        tokenize_documents(docs, load_tokenizer(tokenizer)).astype("<u2").tofile(
            corpus / "tokens" / f"{split}.u16.bin")
        (corpus / "text" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"id": str(i), "text": d}, ensure_ascii=False) + "\n"
                    for i, d in enumerate(docs)), encoding="utf-8")
    pack(corpus, tmp_path / "gpu", train_tokens=10_000, fmt="text")
    unpack(tmp_path / "gpu")
    assert (tmp_path / "gpu" / "val.u16.bin").read_bytes() == \
        (corpus / "tokens" / "val.u16.bin").read_bytes()


def test_whole_document_prefix() -> None:
    ids = np.array([5, 6, 0, 7, 0, 8, 9, 9, 0])
    assert whole_document_prefix(ids, 6, 0) == 5
    assert whole_document_prefix(ids, 100, 0) == 9
    with pytest.raises(ValueError):
        whole_document_prefix(ids, 2, 0)


def test_cli_pack_unpack(built: tuple[Path, tuple], tmp_path: Path, monkeypatch, capsys) -> None:
    root, sources = built
    monkeypatch.setattr(debian_en, "SOURCES", sources)
    out = tmp_path / "packed"
    assert main(["data", "pack", "debian-en", "--out", str(out), "--train-tokens", "2000",
                 "--cache-dir", str(root)]) == 0
    assert main(["data", "unpack", str(out)]) == 0
    assert (out / "train.u16.bin").is_file() and "token files ready" in capsys.readouterr().out
    assert main(["data", "unpack", str(tmp_path)]) == 1  # not a packed folder: a clear error
