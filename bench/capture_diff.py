"""Where a captured step and an eager step part: the harness of
``tests/test_capture.py::test_captured_step_matches_eager_over_merges`` (two tiny bf16 poetx
Llamas, merges at steps 20 and 40, clip warm-up, LR schedule; the second run's state is copied
from the first after every step), step by step, with the parameter that differs most.

Pairs (``--pairs``): ``eager-eager`` (is the eager step deterministic?), ``eager-captured``
(the test) and ``captured-captured`` (is the replayed step deterministic?); ``--no-merge`` runs
without merges. Run once per environment (e.g. with
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before CUDA starts, with or without
``--deterministic``).

    python -m bench.capture_diff --out capture_diff.json
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.common import environment, write_json


def _param_diffs(a, b) -> tuple[float, str]:
    worst, name = 0.0, ""
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if p.requires_grad:
            denom = float(q.detach().float().norm()) or 1.0
            d = float((p.detach().float() - q.detach().float()).norm()) / denom
            if d > worst:
                worst, name = d, n
    return worst, name


def pair(ref_captured: bool, captured: bool, merge_every: int, device: str = "cuda") -> dict:
    from tests.test_capture import _advance, _copy_state_, _llama_setup

    gen = torch.Generator().manual_seed(5)
    fixed = [torch.randint(0, 512, (4, 65), generator=gen).to(device) for _ in range(2)]
    ref, test = (_llama_setup(c, fixed[0], merge_every, device)
                 for c in (ref_captured, captured))
    loss_diff, param_diff, worst = [], [], []
    for i in range(50):
        if i == 30:
            test[5].invalidate()  # as the test: a fresh capture mid-run
        batch = fixed[i % 2]
        a, b = _advance(ref, batch), _advance(test, batch)
        loss_diff.append(abs(a - b) / abs(a))
        d, name = _param_diffs(test[0], ref[0])
        param_diff.append(d)
        worst.append(name)
        _copy_state_(test, ref)
    top = sorted(range(50), key=lambda i: -param_diff[i])[:5]
    return {"merge_every": merge_every,
            "max_loss_diff": max(loss_diff), "max_param_diff": max(param_diff),
            "loss_diff": loss_diff, "param_diff": param_diff,
            "worst_steps": [(i + 1, param_diff[i], worst[i], loss_diff[i]) for i in top],
            "steps_with_loss_diff": [i + 1 for i, v in enumerate(loss_diff) if v > 0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="capture_diff.json")
    parser.add_argument("--pairs", default="eager-eager,eager-captured,captured-captured")
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) (needs "
                             "CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts)")
    args = parser.parse_args()
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    env = {**environment(), "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
           "deterministic": args.deterministic}
    rows = []
    for kind in args.pairs.split(","):
        first, second = kind.split("-")
        row = {**env, "pair": kind, **pair(first == "captured", second == "captured",
                                           1000 if args.no_merge else 20, args.device)}
        rows.append(row)
        print(row["pair"], "merge_every", row["merge_every"], "max loss diff",
              f"{row['max_loss_diff']:.3g}", "max param diff", f"{row['max_param_diff']:.3g}",
              "worst", row["worst_steps"][:3], "loss differs at", row["steps_with_loss_diff"],
              flush=True)
    write_json(args.out, rows, {})


if __name__ == "__main__":
    main()
