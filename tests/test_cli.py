"""The ``poetx`` command line: train / eval / export / plot / data, and its error messages."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import poetx.train.checkpoint.store as ck
import poetx.train.trainer as trainer_mod
from poetx.cli.main import main
from poetx.train.checkpoint import verify_checkpoint
from poetx.train.metrics import read_metrics
from poetx.train.saved_run import load_run
from tests.isolation import assert_loads_without_poetx

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, lines: int = 3000) -> Path:
    r = random.Random(1)
    names = ["Romeo", "Juliet", "Hamlet", "Ophelia", "Lear", "Cordelia"]
    verbs = ["speaks to", "waits for", "dreams of", "runs from", "sings for"]
    places = ["in the garden", "at the gate", "by the sea", "in the hall", "at night"]
    text = "\n".join(f"{r.choice(names)} {r.choice(verbs)} {r.choice(names)} {r.choice(places)}."
                     for _ in range(lines))
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-data")
    return {"corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache"}


def train_argv(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data["corpus"]), "--cache-dir", str(data["cache"]),
            "--vocab-size", "512", "--seq-len", "64", "--batch-size", "4", "--steps", "4",
            "--eval-every", "2", "--save-every", "2", "--eval-batches", "2", "--out", str(out),
            "--no-progress", "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    """One finished poetx run (4 steps, merges every 2) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(train_argv(data, out, "--merge-every", "2")) == 0
    return out


def no_temporaries(run: Path) -> bool:
    root = run / "checkpoints"
    return not root.exists() or not [p for p in root.iterdir() if ".tmp-" in p.name]


# happy paths ------------------------------------------------------------------------------------
def test_train_writes_the_run_dir(run_dir, capsys):
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "tokenizer.json"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004"]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["steps"] == 4 and cfg["poet"]["merge_every"] == 2
    recs = read_metrics(run_dir)
    assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 2, 4]


def test_eval_command(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = [r for r in read_metrics(run_dir) if r["type"] == "eval"][-1]
    assert report["step"] == 4
    assert report["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_plot_writes_pngs(run_dir, data, tmp_path):
    adamw = tmp_path / "adamw"
    assert main(train_argv(data, adamw, "--optimizer", "adamw", "--save-every", "0")) == 0
    png = tmp_path / "png"
    assert main(["plot", str(run_dir), str(adamw), "--out", str(png)]) == 0
    names = sorted(p.name for p in png.iterdir())
    assert names == ["loss.png", "spectrum_adamw.png", "spectrum_run.png", "val_ppl.png"]
    for p in png.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.mark.slow
def test_export_loads_without_poetx_and_gives_the_same_logits(run_dir, tmp_path):
    dest = tmp_path / "hf"
    assert main(["export", str(run_dir), str(dest)]) == 0
    assert (dest / "tokenizer.json").is_file() and (dest / "config.json").is_file()
    assert main(["export", str(run_dir), str(dest)]) == 1  # refuses a non-empty DEST
    model = load_run(run_dir).model  # the POET (wrapped) model
    ids = torch.randint(0, model.config.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert_loads_without_poetx(dest, ids, expected, tmp_path,
                               tokenizer_text="Hamlet waits for Juliet by the sea.")


@pytest.mark.slow
def test_end_to_end_subprocess(data, tmp_path):
    out = tmp_path / "e2e"
    argv = train_argv(data, out, "--steps", "3", "--save-every", "0", "--progress")
    proc = subprocess.run([sys.executable, "-m", "poetx.cli.main", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "val_ppl" in proc.stdout and "step_00000003" in proc.stdout
    assert "loss=" in proc.stderr  # the progress bar
    bad = subprocess.run([sys.executable, "-m", "poetx.cli.main", "train", "--steps", "-3"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "--steps" in bad.stderr and "Traceback" not in bad.stderr


def test_data_install_calls_the_corpus_installer(monkeypatch, tmp_path):
    import poetx.data.corpus as corpus

    seen = []
    monkeypatch.setattr(corpus, "install_corpus", lambda cache_dir=None: seen.append(cache_dir))
    assert main(["data", "install", "--cache-dir", str(tmp_path)]) == 0
    assert seen == [tmp_path]


# errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--steps", "0"], "--steps"),
    (["--steps", "many"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--mode", "quick"], "--mode"),
    (["--device", "tpu"], "--device"),
    (["--preset", "llama-2t"], "--preset"),
    (["--w0-format", "int4"], "--w0-format"),
    (["--block-size", "1"], "--block-size"),
])
def test_bad_flag_values_are_usage_errors(flags, named, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["train", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_missing_files_are_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-corpus.txt"
    assert main(train_argv(data, out)[:1] + ["--data", str(missing), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and err.startswith("poetx: error:") and not out.exists()
    assert main(["train", "--config", str(tmp_path / "nope.toml"), "--out", str(out)]) == 1
    assert "nope.toml" in capsys.readouterr().err
    assert main(["train", *train_argv(data, out)[1:], "--tokenizer",
                 str(tmp_path / "tok.json")]) == 1
    assert "tok.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-run")]) == 1
    assert "no-run" in capsys.readouterr().err


def test_bad_toml_value_names_the_field(data, tmp_path, capsys):
    toml = tmp_path / "cfg.toml"
    toml.write_text("[poet]\nblock_size = 0\n")
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "r")]) == 1
    assert "block_size" in capsys.readouterr().err


@pytest.mark.parametrize("damage,message", [
    ("corrupt", "model.safetensors is corrupt"),
    ("truncated", "model.safetensors is truncated"),
    ("no-manifest", "manifest.json is missing"),
])
def test_damaged_checkpoint_stops_resume_and_eval(data, tmp_path, capsys, damage, message):
    out = tmp_path / "run"
    assert main(train_argv(data, out)) == 0
    newest = out / "checkpoints" / "step_00000004"
    model_file = newest / "model.safetensors"
    if damage == "corrupt":
        blob = bytearray(model_file.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        model_file.write_bytes(bytes(blob))
    elif damage == "truncated":
        os.truncate(model_file, model_file.stat().st_size - 1000)
    else:
        (newest / "manifest.json").unlink()
    capsys.readouterr()
    assert main(train_argv(data, out, "--resume", "--steps", "6")) == 1
    err = capsys.readouterr().err
    assert "step_00000004" in err and message in err
    assert "step_00000002" in err  # the hint names the older checkpoint; no silent fallback
    assert "Traceback" not in err
    assert main(["eval", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert no_temporaries(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002", "step_00000004"]


def test_failing_save_exits_cleanly_and_keeps_the_old_checkpoint(data, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "run"
    real = ck.save_file
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 files per checkpoint: the model file of the second one
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", disk_full_on_second_checkpoint)
    assert main(train_argv(data, out)) == 1
    err = capsys.readouterr().err
    assert "step_00000004" in err and "No space left on device" in err
    assert no_temporaries(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    verify_checkpoint(out / "checkpoints" / "step_00000002")


def test_nan_exits_naming_the_step(data, tmp_path, capsys, monkeypatch):
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def nan_at_three(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss + float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_mod, "compute_loss", nan_at_three)
    out = tmp_path / "run"
    assert main(train_argv(data, out)) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "step_00000002" in err
    assert no_temporaries(out)


def test_ctrl_c_saves_and_exits_130(data, tmp_path, capsys, monkeypatch):
    real = trainer_mod.compute_loss
    calls = {"n": 0}

    def interrupt_at_three(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(trainer_mod, "compute_loss", interrupt_at_three)
    out = tmp_path / "run"
    assert main(train_argv(data, out, "--save-every", "0")) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 2" in err and "--resume" in err
    assert (out / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    monkeypatch.setattr(trainer_mod, "compute_loss", real)
    assert main(train_argv(data, out, "--save-every", "0", "--resume")) == 0
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"] == [1, 2, 3, 4]


def test_existing_run_needs_resume(run_dir, data, capsys):
    assert main(train_argv(data, run_dir)) == 1
    assert "--resume" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("POETX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["eval", str(tmp_path / "no-run")])


def test_out_of_memory_suggests_the_memory_options(data, tmp_path, capsys, monkeypatch):
    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_mod, "compute_loss", oom)
    assert main(train_argv(data, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    for hint in ("--mode mem", "--batch-size", "--w0-format int8", "--grad-checkpointing"):
        assert hint in err
    assert "Traceback" not in err and no_temporaries(tmp_path / "run")
