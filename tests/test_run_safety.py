"""A fresh machine and crashes: stranded runs, foreign files, permissions, optional extras."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poetx.cli.main import main
from poetx.train.checkpoint.format import manifest_of
from poetx.train.metrics import MetricsLogger, Progress, read_metrics
from tests.test_cli import no_temporaries, train_argv, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety-data")
    return {"corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache"}


def _killed_run(data, out: Path, when: str) -> subprocess.CompletedProcess:
    """Run ``poetx train`` in a child that SIGKILLs itself before its first checkpoint
    (``step``: in the first step) or in the middle of writing it (``save``)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import poetx.train.checkpoint.store as store
        import poetx.train.trainer as trainer
        from poetx.cli.main import main

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        if {when!r} == "save":
            store.save_file = die          # the first file of the first checkpoint
        else:
            trainer.compute_loss = die     # the first training step
        sys.exit(main({train_argv(data, out)!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("when", ["step", "save"])
def test_a_run_killed_before_its_first_checkpoint_can_restart_and_resume(data, tmp_path, when,
                                                                         capsys):
    out = tmp_path / "run"
    proc = _killed_run(data, out, when)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "config.json").is_file()
    stale = list((out / "checkpoints").glob("step_*.tmp-*")) if when == "save" else []
    assert bool(stale) == (when == "save")  # the kill left the half-written folder behind

    again = tmp_path / "again"
    shutil.copytree(out, again)
    # --resume: nothing to resume from yet, so the run starts again from step 0
    assert main(train_argv(data, out, "--resume")) == 0
    assert "starting it again from step 0" in capsys.readouterr().out
    # without --resume: the directory holds no finished checkpoint, so it is taken over
    assert main(train_argv(data, again)) == 0
    for run in (out, again):
        assert no_temporaries(run)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
            "step_00000002", "step_00000004"]
        assert [r["step"] for r in read_metrics(run) if r["type"] == "train"] == [1, 2, 3, 4]
    # a run with a finished checkpoint is still protected
    assert main(train_argv(data, again)) == 1
    assert "--resume" in capsys.readouterr().err


def test_a_live_run_that_has_not_saved_yet_is_not_taken_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "metrics.jsonl").write_text(json.dumps(
            {"type": "event", "step": 0, "event": "start", "pid": sleeper.pid}) + "\n")
        assert main(train_argv(data, out)) == 1
        err = capsys.readouterr().err
        assert f"process {sleeper.pid} is still running" in err and str(out) in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(train_argv(data, out)) == 0  # its process is gone: the directory is free


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-run") / "run"
    assert main(train_argv(data, out)) == 0
    return out


def _damaged_copy(run: Path, tmp_path: Path) -> Path:
    """A copy whose newest model file is not safetensors, yet matches its manifest."""
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step_00000004"
    (newest / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not tensors")
    (newest / "manifest.json").write_text(json.dumps(manifest_of(newest, 4)))
    return copy


@pytest.mark.parametrize("command", ["resume", "eval", "export"])
def test_a_foreign_model_file_is_named_and_an_older_checkpoint_suggested(finished_run, data,
                                                                       tmp_path, capsys,
                                                                       command):
    run = _damaged_copy(finished_run, tmp_path)
    argv = {"resume": train_argv(data, run, "--resume", "--steps", "6"),
            "eval": ["eval", str(run)],
            "export": ["export", str(run), str(tmp_path / "hf")]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "step_00000004/model.safetensors cannot be read as safetensors" in err
    hint = "--resume" if command == "resume" else "--checkpoint"
    assert hint in err and "step_00000002" in err  # how to use the previous checkpoint
    older = run / "checkpoints" / "step_00000002"
    if command != "resume":
        assert main([*argv, "--checkpoint", str(older)]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(finished_run, data, tmp_path, umask):
    previous = os.umask(umask)
    try:
        dest = tmp_path / "hf"
        assert main(["export", str(finished_run), str(dest)]) == 0
        run = tmp_path / "run"
        shutil.copytree(finished_run, run)
        shutil.rmtree(run / "checkpoints" / "step_00000004")
        assert main(train_argv(data, run, "--resume")) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    written = [*dest.iterdir(), *(run / "checkpoints" / "step_00000004").iterdir(),
               run / "config.json", run / "metrics.jsonl"]
    assert any(p.suffix == ".safetensors" for p in dest.iterdir())
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


def test_plot_without_matplotlib_names_the_extra(finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["plot", str(finished_run), "--out", str(tmp_path / "png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("poetx: error:") and "poetx[plot]" in err and "Traceback" not in err


def test_progress_in_a_file_prints_the_last_step_once():
    stream = io.StringIO()
    progress = Progress(total=95, initial=0, enabled=True, stream=stream)
    for _ in range(95):
        progress.update(1.5, 1000.0, 1e-3, 0.5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert sum(line.startswith("step 95/95 ") for line in lines) == 1
    assert 5 <= len(lines) <= 11 and all("loss=1.5000" in line for line in lines)


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    """Without the package a run writes no tensorboard/ folder; with it (the dev extra
    installs it) the folder holds event files."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    (tmp_path / "without").mkdir()
    logger = MetricsLogger(tmp_path / "without", tensorboard=True)
    logger.log({"type": "train", "step": 1, "loss": 1.0})
    logger.close()
    assert sorted(p.name for p in (tmp_path / "without").iterdir()) == ["metrics.jsonl"]
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    (tmp_path / "with").mkdir()
    logger = MetricsLogger(tmp_path / "with", tensorboard=True)
    logger.log({"type": "train", "step": 1, "loss": 1.0})
    logger.close()
    assert any((tmp_path / "with" / "tensorboard").iterdir())


def test_every_dependency_is_bounded():
    """An open upper bound let a fresh install pull an untested release (triton 3.9)."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    for requirement in requirements:
        spec = requirement.split(";")[0]
        assert re.search(r">=\s*[\d.]+", spec) and re.search(r"<\s*[\d.]+", spec), requirement
    assert project["requires-python"] == ">=3.11"  # numpy 2.4 needs it; tomllib is built in
