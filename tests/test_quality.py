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
    expected = quality.TOKENS / speeds[("llama-60m", "poetx")] + quality.OVERHEAD_S
    assert quality.estimate_seconds(run, speeds) == pytest.approx(expected)


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
