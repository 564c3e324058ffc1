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
    assert len(names) == len(set(names)) == 20
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


def test_ablation_summary_compares_a_cut_run_at_its_last_shared_step() -> None:
    ref = {"best_val_ppl": 20.0, "curve": [[0, 0, 0.0, 900.0], [100, 10, 1.0, 30.0],
                                           [200, 20, 2.0, 25.0], [300, 30, 3.0, 20.0]]}
    cut = {"poet_flags": "--neumann-terms exact", "status": "partial", "steps_done": 250,
           "steps": 300, "best_val_ppl": 24.0,
           "curve": [[0, 0, 0.0, 900.0], [100, 10, 5.0, 33.0], [200, 20e6, 9.0, 26.0]]}
    done = {"poet_flags": "--merge-every 50", "status": "done", "best_val_ppl": 21.0}
    lines = quality.ablation_summary([ref], [cut, done])
    # the cut run at step 200 (its last evaluation) against the reference's value there,
    # not its best against the reference's best at step 300
    assert "at step 200 (20.0 M tokens) 26.00 against the reference's 25.00" in lines[0]
    assert "+4.0%" in lines[0] and "cut short at step 250 of 300" in lines[0]
    assert lines[1] == "- `--merge-every 50`: 21.00 against 20.00 (+5.0%)."


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


def test_step_segments_group_the_steps_read_together() -> None:
    def train(step: int, step_s: float, elapsed: float) -> dict:
        return {"type": "train", "step": step, "step_s": step_s, "elapsed_s": elapsed}

    records = [train(1, 0.5, 1.5), train(2, 0.5, 1.5), train(3, 0.5, 1.5),
               {"type": "eval", "step": 3, "val_ppl": 9.0},
               train(4, 1.0, 3.6), train(5, 1.0, 3.6)]
    assert quality.step_segments(records) == [(0.0, 1.5, 3), (1.6, 3.6, 2)]
    # a resumed process restarts its clock: only its own steps count
    resumed = [*records, train(6, 0.25, 0.5), train(7, 0.25, 0.5)]
    assert quality.step_segments(resumed) == [(0.0, 0.5, 2)]


def test_sharing_stats_from_segments() -> None:
    # a steps from 0 to 30 s (10 steps a second); b on the same GPU from 0 to 10 s with a gap
    # (an evaluation) at 4-6 s; c on another GPU all along (5 steps a second).
    a = [(float(t), t + 1.0, 10) for t in range(30)]
    b = [(0.0, 2.0, 4), (2.0, 4.0, 4), (6.0, 8.0, 4), (8.0, 10.0, 4)]
    c = [(float(t), t + 1.0, 5) for t in range(30)]
    runs = {"a": ("0", 0.0, a), "b": ("0", 0.0, b), "c": ("1", 0.0, c)}
    got = quality.sharing_stats(runs, "a", tokens_per_step=100)
    assert got["runs_on_gpu_max"] == 2
    # b's evaluation gap still counts as b on the GPU: a is alone from 10 s on only
    assert got["alone_s"] == pytest.approx(20.0)
    assert got["runs_on_gpu_mean"] == pytest.approx((10 * 2 + 20 * 1) / 30)
    assert got["gpu_share_s"] == pytest.approx(10 / 2 + 20)
    assert got["tokens_per_s_alone"] == pytest.approx(10 * 100)
    got = quality.sharing_stats(runs, "b", tokens_per_step=100)
    assert got["runs_on_gpu_max"] == 2 and got["runs_on_gpu_mean"] == pytest.approx(2.0)
    assert got["alone_s"] == 0 and got["tokens_per_s_alone"] is None
    got = quality.sharing_stats(runs, "c", tokens_per_step=100)
    assert got["runs_on_gpu_max"] == 1 and got["alone_s"] == pytest.approx(30.0)
    assert got["tokens_per_s_alone"] == pytest.approx(5 * 100)
    # b's clock started 25 s after a's: they now overlap from 25 to 30 s
    runs["b"] = ("0", 25.0, b)
    assert quality.sharing_stats(runs, "a", 100)["alone_s"] == pytest.approx(25.0)
    # too short alone to report a speed
    short = {"c": ("1", 0.0, c[:6])}
    got = quality.sharing_stats(short, "c", tokens_per_step=100)
    assert got["alone_s"] == pytest.approx(6.0) and got["tokens_per_s_alone"] is None


def test_newest_train_record(tmp_path: Path) -> None:
    assert quality.newest_train_record(tmp_path) is None
    lines = [json.dumps({"type": "train", "step": s, "elapsed_s": s / 10, "pad": "x" * 100})
             for s in range(1, 400)]
    lines.append(json.dumps({"type": "eval", "step": 399, "val_ppl": 9.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"type": "tr')
    assert quality.newest_train_record(tmp_path)["step"] == 399


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


def test_speeds_are_compared_on_one_device() -> None:
    h100 = {"preset": "llama-130m", "poet_flags": "", "group": "sweep", "device": "H100"}
    rows = [{**h100, "optimizer": "poetx", "tokens_per_s_alone": 180.0},
            {**h100, "optimizer": "poetx", "tokens_per_s_alone": 200.0},
            {**h100, "optimizer": "adamw", "tokens_per_s_alone": 220.0},
            {**h100, "optimizer": "poetx", "device": "H200", "tokens_per_s_alone": 197.0},
            {**h100, "optimizer": "adamw", "device": "H200", "tokens_per_s_alone": 255.0}]
    assert quality.speed_device(rows, "llama-130m") == "H100"  # more runs measured there
    on_h200 = rows[3]
    assert quality.alone_speed(on_h200, rows) == (197.0, "alone")
    # on the H100, its speed is that of the alike runs there, not its own H200 speed
    assert quality.alone_speed(on_h200, rows, "H100") == (190.0, "alike")
    assert quality.alone_speed(rows[0], rows, "H200") == (197.0, "alike")
    # a device where only one optimizer was measured cannot compare them
    assert quality.speed_device(rows[:2] + rows[3:4], "llama-130m") is None
    assert quality.alone_speed({**rows[2], "preset": "llama-60m"}, rows, "H200") == (None, "")


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
    assert "1 of 20 runs done" in text and "60m-poetx-lr0.01" in text
    assert (tmp_path / "quality_ppl_tokens.png").stat().st_size > 0


def test_report_without_results_says_pending(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    quality.report(tmp_path / "none.json", doc, tmp_path)
    text = doc.read_text()
    assert "pending a GPU session" in text and "0 of 20 runs done" in text
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
    # both went at once: each started before the other ended
    assert first["started_unix"] < second["ended_unix"]
    assert second["started_unix"] < first["ended_unix"]
    # whether their steps overlapped depends on the machine's timing (sharing_stats is tested
    # on fixed segments above); each row says how it went
    for row in (first, second):
        assert row["runs_on_gpu_max"] in (1, 2) and row["gpu_share_s"] > 0
        assert row["alone_s"] <= row["gpu_share_s"] + 1e-9


def test_code_version_from_git_or_the_staged_file(tmp_path: Path) -> None:
    """Each row says which commit ran it: this checkout's, or a staged copy's recorded one,
    also when the copy is staged inside another checkout."""
    import subprocess

    head = subprocess.run(["git", "-C", str(quality.ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert quality.code_version() == head
    assert quality.code_version(tmp_path) == "unknown"
    # a copy staged inside another checkout: its file, not that checkout's commit
    checkout = tmp_path / "checkout"
    stage = checkout / ".stage" / "quality"
    stage.mkdir(parents=True)
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    other = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert quality.code_version(stage) == other
    (stage / quality.CODE_FILE).write_text("abc1234\n")
    assert quality.code_version(stage) == "abc1234"
