"""bench/quality.py: the study's grid, reading runs, spike counting, and a tiny queue on CPU."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import quality
from poetx.data.tokenizer import EOT, train_tokenizer
from poetx.data.transport import pack, unpack


def test_spike_count_needs_a_full_window() -> None:
    flat = [3.0] * 120
    assert quality.count_loss_spikes(flat) == 0
    spiky = list(flat)
    spiky[10] = 100.0  # no full window of 50 before it: not counted
    spiky[80] = 4.6  # > 1.5 x 3.0
    spiky[81] = 4.4  # < 1.5 x 3.0
    spiky[90] = math.nan
    assert quality.count_loss_spikes(spiky) == 2
    # a falling loss has no spikes; a jump back to the starting level is one
    falling = list(np.linspace(10, 3, 200))
    assert quality.count_loss_spikes(falling) == 0
    assert quality.count_loss_spikes([*falling, 10.0]) == 1


def test_summarize_reads_resumed_runs() -> None:
    records = [{"type": "eval", "step": 0, "val_ppl": 500.0, "tokens": 0}]
    for step in range(1, 7):
        # the second process (steps 4-6) restarts its clock
        elapsed = step * 2.0 if step <= 3 else (step - 3) * 2.0
        records.append({"type": "train", "step": step, "loss": 5.0 - 0.1 * step,
                        "tokens": step * 100, "tokens_per_s": 50.0 + step,
                        "peak_mem_gib": 1.0 + step / 10, "elapsed_s": elapsed})
        if step % 3 == 0:
            records.append({"type": "eval", "step": step, "val_ppl": 100.0 / step,
                            "tokens": step * 100})
    summary = quality.summarize(records, steps=6)
    assert summary["done"] and summary["steps_done"] == 6 and summary["tokens_seen"] == 600
    assert summary["final_val_ppl"] == pytest.approx(100 / 6)
    assert summary["best_val_ppl"] == pytest.approx(100 / 6)
    assert summary["peak_gib"] == pytest.approx(1.6)
    assert summary["wall_s"] == pytest.approx(12.0)  # 6 s + 6 s
    assert [c[0] for c in summary["curve"]] == [0, 3, 6]
    assert summary["curve"][2][2] == pytest.approx(12.0)
    assert not quality.summarize(records, steps=10)["done"]


def test_study_grid() -> None:
    runs = quality.study()
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 19
    # the 60M sweep of both methods comes first
    assert [r.preset for r in runs[:6]] == ["llama-60m"] * 6
    assert {r.optimizer for r in runs[:6]} == {"poetx", "adamw"}
    sweep = [r for r in runs if r.group == "sweep"]
    for preset, (adamw_lr, lr, poet_lr) in quality.PRESET_LRS.items():
        got_adamw = sorted(r.lr for r in sweep if r.preset == preset and r.optimizer == "adamw")
        assert got_adamw == pytest.approx([adamw_lr / 2, adamw_lr, adamw_lr * 2])
        got_poetx = sorted((r.lr, r.poet_lr) for r in sweep
                           if r.preset == preset and r.optimizer == "poetx")
        assert [p[1] / p[0] for p in got_poetx] == pytest.approx([poet_lr / lr] * 3)
    ablation = {r.name: r for r in runs if r.group == "ablation"}
    assert ablation["60m-poetx-b512"].poet_lr == pytest.approx(5e-4)  # 256 / b convention
    assert ("--neumann-terms", "exact") in ablation["60m-poetx-exact"].poet
    assert quality.TOKENS >= 25_000_000
    cmd = runs[0].command(Path("d"), Path("r"))
    assert cmd[cmd.index("--warmup-steps") + 1] == str(quality.WARMUP)


def test_estimate_uses_measured_speeds() -> None:
    speeds = quality.measured_tokens_per_s()
    assert {("llama-60m", "poetx"), ("llama-60m", "adamw"),
            ("llama-130m", "poetx")} <= speeds.keys()
    run = quality.study()[0]
    # 1600 training steps and 17 evaluations of 32 forward-only batches (a third of a step each)
    steps = quality.STEPS + (quality.STEPS // quality.EVAL_EVERY + 1) * quality.EVAL_BATCHES / 3
    gpu_s = steps * quality.BATCH * quality.SEQ_LEN / speeds[("llama-60m", "poetx")]
    assert quality.gpu_seconds(run, speeds) == pytest.approx(gpu_s)
    assert quality.gpu_seconds(run, speeds, speed_scale=0.5) == pytest.approx(2 * gpu_s)
    assert quality.estimate_seconds(run, speeds) == pytest.approx(gpu_s + quality.OVERHEAD_S)


def test_projected_end_counts_work_committed_to_the_gpu() -> None:
    over = quality.OVERHEAD_S
    # an idle GPU: start-up, then the run's own work
    assert quality.projected_end(100.0, 100.0, 50.0) == pytest.approx(100 + over + 50)
    # a GPU owing 500 s: the new run's start-up hides under that work, its steps come after
    assert quality.projected_end(600.0, 100.0, 50.0) == pytest.approx(650.0)
    # three runs started together on one GPU end when the sum of their work is done
    free_at = 0.0
    for work in (100.0, 80.0, 120.0):
        free_at = quality.projected_end(free_at, 0.0, work)
    assert free_at == pytest.approx(over + 300.0)


def test_sharing_stats_from_polls() -> None:
    # runs a and b share GPU 0 for 10 s (both advancing), then a runs alone for 20 s; c is on
    # GPU 1 all along and never shares; b stalls (evaluates) between 4 and 6 s.
    polls: list[quality.Poll] = []
    for t in range(0, 31, 2):
        going = {"a": ("0", 10 * t), "c": ("1", 5 * t)}
        if t <= 10:
            going["b"] = ("0", 3 * min(t, 4) + 3 * max(0, t - 6))
        polls.append((float(t), going))
    a = quality.sharing_stats(polls, "a", tokens_per_step=100)
    assert a["runs_on_gpu_max"] == 2
    # a steps 30 s: 8 s beside b, 2 s (4-6) with b stalled, 20 s with b gone
    assert a["alone_s"] == pytest.approx(22.0)
    assert a["runs_on_gpu_mean"] == pytest.approx((8 * 2 + 22 * 1) / 30)
    assert a["gpu_share_s"] == pytest.approx(8 / 2 + 22)
    assert a["tokens_per_s_alone"] == pytest.approx(10 * 100)
    b = quality.sharing_stats(polls, "b", tokens_per_step=100)
    assert b["runs_on_gpu_max"] == 2 and b["runs_on_gpu_mean"] == pytest.approx(2.0)
    assert b["alone_s"] == 0 and b["tokens_per_s_alone"] is None
    c = quality.sharing_stats(polls, "c", tokens_per_step=100)
    assert c["runs_on_gpu_max"] == 1 and c["alone_s"] == pytest.approx(30.0)
    assert c["tokens_per_s_alone"] == pytest.approx(5 * 100)
    # too short alone to report a speed
    short = quality.sharing_stats(polls[:4], "c", tokens_per_step=100)
    assert short["alone_s"] == pytest.approx(6.0) and short["tokens_per_s_alone"] is None


def test_last_train_step_reads_the_newest_record(tmp_path: Path) -> None:
    assert quality.last_train_step(tmp_path) == 0
    lines = [json.dumps({"type": "train", "step": s, "loss": 1.0, "pad": "x" * 100})
             for s in range(1, 400)]
    lines.append(json.dumps({"type": "eval", "step": 399, "val_ppl": 9.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"type": "tr')
    assert quality.last_train_step(tmp_path) == 399


def test_alone_speed_falls_back_to_alike_runs() -> None:
    base = {"preset": "llama-60m", "optimizer": "poetx", "poet_flags": "", "device": "H100"}
    measured = {**base, "tokens_per_s_alone": 300.0, "runs_on_gpu_max": 3}
    shared = {**base, "tokens_per_s_alone": None, "runs_on_gpu_max": 3, "tokens_per_s": 90.0}
    solo = {**base, "optimizer": "adamw", "runs_on_gpu_max": 1, "tokens_per_s": 400.0}
    other = {**shared, "optimizer": "adamw", "device": "H200"}
    rows = [measured, shared, solo, other]
    assert quality.alone_speed(measured, rows) == (300.0, "alone")
    assert quality.alone_speed(shared, rows) == (300.0, "alike")  # not its shared 90
    assert quality.alone_speed(solo, rows) == (400.0, "alone")  # never shared: its own
    assert quality.alone_speed(other, rows) == (None, "")
    # nothing alike, always shared: its tokens over its share of the GPU's time
    share = {**other, "tokens_seen": 1000, "gpu_share_s": 4.0}
    assert quality.alone_speed(share, [share]) == (250.0, "share")


@pytest.fixture(scope="module")
def tiny_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed corpus in the layout of ``poetx data pack``, made from random words."""
    root = tmp_path_factory.mktemp("quality")
    rng = np.random.RandomState(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "road", "song"]
    docs = {split: [" ".join(rng.choice(words, 300)) + "." for _ in range(n)]
            for split, n in (("train", 40), ("val", 6))}
    tok = train_tokenizer(docs["train"], 300)
    corpus = root / "corpus"
    (corpus / "tokens").mkdir(parents=True)
    (corpus / "text").mkdir()
    tok.save(str(corpus / "tokenizer.json"))
    from poetx.data.dataset import tokenize_documents

    for split, texts in docs.items():
        tokenize_documents(texts, tok).astype("<u2").tofile(corpus / "tokens" / f"{split}.u16.bin")
        with (corpus / "text" / f"{split}.jsonl").open("w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"id": f"{split}{i}", "text": text}) + "\n")
    assert tok.token_to_id(EOT) == 0
    pack(corpus, root / "gpu", train_tokens=10_000)
    unpack(root / "gpu")
    return root / "gpu"


def test_queue_runs_on_cpu_skips_finished_runs_and_reports(
    tiny_packed: Path, tmp_path: Path, capsys
) -> None:
    specs = [dataclasses.replace(s, preset="tiny", steps=3) for s in quality.study()
             if s.name == "60m-poetx-lr0.01"]
    results = tmp_path / "quality.json"
    extra = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--device", "cpu"]
    quality.run_queue(specs, ["cpu"], tiny_packed, tmp_path / "runs", results, None, extra,
                      poll_s=0.2)
    rows = quality.load_results(results)
    assert set(rows) == {s.name for s in specs}
    for row in rows.values():
        assert row["status"] == "done", (tmp_path / "runs" / row["name"] / "log.txt").read_text()
        assert row["steps_done"] == 3 and row["tokens_seen"] == 3 * 2 * 32
        assert row["warmup_steps"] == 0 and "--warmup-steps 0" in row["command"]
        assert row["final_val_ppl"] > 1 and row["best_val_ppl"] <= row["final_val_ppl"]
        assert row["device"] == "cpu" and row["command"].startswith("python -m poetx.cli.main")
        assert row["loss_spikes"] == 0 and row["peak_gib"] > 0
    # a second call skips them
    quality.run_queue(specs, ["cpu"], tiny_packed, tmp_path / "runs", results, None, extra)
    assert "1 finished runs skipped" in capsys.readouterr().out
    row = rows["60m-poetx-lr0.01"]
    assert row["runs_on_gpu_max"] == 1 and row["ended_unix"] > row["started_unix"]
    doc = tmp_path / "results.md"
    quality.report(results, doc, tmp_path)
    text = doc.read_text()
    assert "1 of 19 runs done" in text and "60m-poetx-lr0.01" in text
    assert (tmp_path / "quality_ppl_tokens.png").stat().st_size > 0


def test_report_without_results_says_pending(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    quality.report(tmp_path / "none.json", doc, tmp_path)
    text = doc.read_text()
    assert "pending a GPU session" in text and "0 of 19 runs done" in text
    assert not list(tmp_path.glob("*.png"))


def test_queue_runs_two_at_once_on_one_device(tiny_packed: Path, tmp_path: Path) -> None:
    specs = [dataclasses.replace(s, preset="tiny", steps=40) for s in quality.study()[:2]]
    results = tmp_path / "quality.json"
    extra = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--device", "cpu",
             "--eval-every", "0", "--metrics-every", "1"]
    quality.run_queue(specs, ["cpu", "cpu"], tiny_packed, tmp_path / "runs", results, None,
                      extra, poll_s=0.2)
    rows = quality.load_results(results)
    assert {r["status"] for r in rows.values()} == {"done"}
    first, second = (rows[s.name] for s in specs)
    # both went at once: each started before the other ended, and both saw two runs going
    assert first["started_unix"] < second["ended_unix"]
    assert second["started_unix"] < first["ended_unix"]
    assert first["runs_on_gpu_max"] == second["runs_on_gpu_max"] == 2
