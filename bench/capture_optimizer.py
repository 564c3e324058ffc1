"""Captured vs eager Trainer steps with each fused-AdamW variant (a diagnostic, GPU only).

Runs ``tests/test_trainer.py``'s tiny bf16 CUDA Trainer for 6 steps (a merge after step 3),
with and without the optimizer step in backward, three ways: eager with the non-capturable
fused AdamW (what eager steps used before 2026-11-30), eager with the capturable one, and
captured. Prints the losses and which agree bitwise; writes JSON.

    python3 -m bench.capture_optimizer --out bench/results/capture_optimizer.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import environment, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def losses(graphs: bool, step_in_backward: bool, capturable: bool, steps: int = 6) -> list[float]:
    import test_trainer as harness

    import poetx.train.trainer as trainer_mod

    original = trainer_mod.make_optimizer

    def forced(*args, **kwargs):
        kwargs["capturable"] = capturable
        return original(*args, **kwargs)

    trainer_mod.make_optimizer = forced
    try:
        trainer = harness._cuda_trainer(cuda_graphs=graphs, step_in_backward=step_in_backward)
    finally:
        trainer_mod.make_optimizer = original
    out = []
    for step in range(steps):
        out.append(float(trainer.step_fn(trainer.load_batch(step))["loss"]))
        trainer._advance_schedules(step + 1)
    return out


def first_difference(a: list[float], b: list[float]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/capture_optimizer.json")
    args = p.parse_args()
    command = "python3 -m bench.capture_optimizer " + " ".join(sys.argv[1:])
    rows = []
    for sib in (False, True):
        eager = losses(False, sib, capturable=False)
        eager_cap = losses(False, sib, capturable=True)
        captured = losses(True, sib, capturable=True)
        row = dict(command=command, step_in_backward=sib, eager=eager,
                   eager_capturable=eager_cap, captured=captured,
                   first_step_eager_vs_captured=first_difference(eager, captured),
                   first_step_eager_capturable_vs_captured=first_difference(eager_cap, captured))
        rows.append(row)
        print(f"step_in_backward={sib}: eager (non-capturable) parts from captured at step "
              f"{row['first_step_eager_vs_captured']}, eager (capturable) at step "
              f"{row['first_step_eager_capturable_vs_captured']}")
    write_json(args.out, rows, environment())


if __name__ == "__main__":
    main()
