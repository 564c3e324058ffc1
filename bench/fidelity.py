"""Does POET-X stay a rotation? Measurements behind the rotation-lr convention and the merge.

Three parts (CPU is enough; ``--part`` picks one):

* ``qnorm``: real short training runs (library API, the ``poetx train`` model and data) under
  rotation-lr conventions: the largest block ``||Q||_F`` (logged every step) and ``||Q||_2``
  (every 10 steps), max per 100 steps, and the mean loss in the 5 steps before / after each
  merge (Adam restart ``reset`` as the authors, or ``rewarm``).
* ``drift``: 50 merges of random rotations of one layer with bf16 / int8 / fp8 ``W0``: the old
  merge (truncated map folded, re-rounded from the stored value) against the new one (exact
  Cayley, residual fed back): singular values against the initial ``W0`` and distance to the
  exactly merged float64 weight.
* ``merge_step``: relative change of the layer output at a merge against ``||Q||``.

Writes ``bench/results/fidelity.json`` (one row per measurement, with command and device).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import environment, print_table
from poetx import MergeSchedule, POETConfig, POETLinear, make_optimizer
from poetx.model.wrap import poet_layers, rotation_norm_max
from poetx.ortho.cayley import skew_from_half

RESULTS = Path(__file__).parent / "results" / "fidelity.json"


def spectral_q_max(model) -> float:
    worst = 0.0
    for _, layer in poet_layers(model):
        for theta, lay in ((layer.theta_in, layer.layout_in), (layer.theta_out, layer.layout_out)):
            q = skew_from_half(theta.detach().double(), lay.block)
            worst = max(worst, float(torch.linalg.matrix_norm(q, ord=2).max()))
    return worst


def run_training(preset: str, steps: int, poet_lr: float, poet_eps: float, restart: str,
                 batch_size: int | None, seq_len: int | None, merge_every: int | None,
                 vocab_size: int | None, max_q_norm: float = 0.0) -> dict:
    from poetx.data.dataset import build_data
    from poetx.train.config import TrainConfig
    from poetx.train.loss import compute_loss
    from poetx.train.run_model import build_run_model
    from poetx.train.schedule import build_scheduler

    poet = {"adam_restart": restart, "max_q_norm": max_q_norm}
    if merge_every:
        poet["merge_every"] = merge_every
    cfg = TrainConfig(preset=preset, steps=steps, poet_lr=poet_lr, batch_size=batch_size,
                      seq_len=seq_len, vocab_size=vocab_size, poet=poet, device="cpu")
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.seq_len, cfg.batch_size, cfg.seed, vocab_size=cfg.vocab_size)
    model = build_run_model(cfg, data.vocab_size, torch.device("cpu"), torch.float32)
    opt = make_optimizer(model, lr=cfg.lr, poet_lr=cfg.poet_lr, poet_eps=poet_eps)
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    merge = MergeSchedule(model, opt, cfg.poet, cfg.clip_warmup_steps, cfg.clip_warmup_start)
    params = [p for g in opt.param_groups for p in g["params"]]
    losses, qf, q2 = [], [], {}
    merges = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = compute_loss(model, data.train.batch(step - 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, merge.clip_value(cfg.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        qf.append(float(rotation_norm_max(model)))
        if step % 10 == 0 or step % cfg.poet.merge_every == 0:
            q2[step] = spectral_q_max(model)
        if merge.step():
            merges.append(step)
        losses.append(float(loss))
    row = {"part": "qnorm", "preset": preset, "steps": steps, "batch": cfg.batch_size,
           "seq": cfg.seq_len, "block": cfg.poet.block_size, "T": cfg.poet.merge_every,
           "poet_lr": poet_lr, "poet_eps": poet_eps, "restart": restart,
           "max_q_norm": max_q_norm, "merges": merges,
           "seconds": round(time.perf_counter() - t0, 1)}
    for start in range(0, steps, 100):
        stop = min(steps, start + 100)
        row[f"qF_max_{start + 1}_{stop}"] = round(max(qf[start:stop]), 4)
        row[f"q2_max_{start + 1}_{stop}"] = round(
            max(v for k, v in q2.items() if start < k <= stop), 4)
    bumps = []
    for m in merges:
        if m + 5 <= steps and m >= 5:
            before = sum(losses[m - 5:m]) / 5
            after = sum(losses[m:m + 5]) / 5
            bumps.append(after - before)
    row["loss_after_minus_before_merge"] = [round(b, 4) for b in bumps]
    row["mean_merge_bump"] = round(sum(bumps) / len(bumps), 4) if bumps else None
    row["final_loss_mean10"] = round(sum(losses[-10:]) / 10, 4)
    row["losses"] = [round(v, 4) for v in losses]
    row["q_fro"] = [round(v, 4) for v in qf]
    return row


def _old_merge_(layer: POETLinear) -> None:
    """The merge before this change: fold the truncated map, re-round from the stored value."""
    with torch.no_grad():
        merged = layer.effective_weight(torch.float32)
        layer.merge_count += 1
        layer._draw_permutations()
        layer.set_dense_weight(merged)
        if layer.w0_residual is not None:
            layer.w0_residual.zero_()
        layer.theta_in.zero_()
        layer.theta_out.zero_()


def drift(n_in: int, n_out: int, block: int, merges: int, q_scale: float) -> list[dict]:
    rows = []
    for fmt, dtype in (("auto", torch.bfloat16), ("int8", torch.float32), ("fp8", torch.float32)):
        for variant in ("old", "new"):
            cfg = POETConfig(block_size=block, w0_format=fmt,
                             w0_residual="host" if variant == "new" else "off")
            ref_cfg = POETConfig(block_size=block, neumann_terms=None)
            layer = POETLinear(n_in, n_out, bias=False, config=cfg, name="l", dtype=dtype)
            gen = torch.Generator().manual_seed(0)
            w_init = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
            w_init /= w_init.norm(dim=1, keepdim=True)
            layer.set_dense_weight(w_init.float())
            ref = POETLinear(n_in, n_out, bias=False, config=ref_cfg, name="l",
                             dtype=torch.float64, weight=w_init)
            sv0 = torch.linalg.svdvals(w_init)
            qs, q2s = [], []
            for _ in range(merges):
                with torch.no_grad():
                    for t in (layer.theta_in, layer.theta_out):
                        t.normal_(0, q_scale, generator=gen)
                    ref.theta_in.copy_(layer.theta_in)
                    ref.theta_out.copy_(layer.theta_out)
                qs.append(float(rotation_norm_max(layer)))
                q2s.append(spectral_q_max(layer))
                (_old_merge_ if variant == "old" else POETLinear.merge_)(layer)
                ref.merge_()
            stored = layer.effective_weight(torch.float64)
            exact = ref.effective_weight(torch.float64)
            sv = torch.linalg.svdvals(stored)
            rows.append({
                "part": "drift", "w0": "bf16" if fmt == "auto" else fmt, "merge": variant,
                "shape": f"{n_out}x{n_in}", "block": block, "merges": merges,
                "q_fro_mean": round(sum(qs) / len(qs), 3),
                "q2_mean": round(sum(q2s) / len(q2s), 3),
                "sigma_max_ratio": round(float(sv[0] / sv0[0]), 5),
                "sigma_min_ratio": round(float(sv[-1] / sv0[-1]), 5),
                "max_rel_sv_change": float(((sv - sv0).abs() / sv0[0]).max()),
                "rel_dist_to_exact": float((stored - exact).norm() / exact.norm()),
            })
    return rows


def merge_step(n: int, block: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, n, dtype=torch.float64, generator=gen)
    for scale in (0.001, 0.003, 0.01, 0.02, 0.04):
        layer = POETLinear(n, n, bias=False, config=POETConfig(block_size=block), name="m",
                           dtype=torch.float64)
        with torch.no_grad():
            layer.theta_in.normal_(0, scale, generator=gen)
            layer.theta_out.normal_(0, scale, generator=gen)
            q2 = 0.0
            for theta, lay in ((layer.theta_in, layer.layout_in),
                               (layer.theta_out, layer.layout_out)):
                q = skew_from_half(theta, lay.block)
                q2 = max(q2, float(torch.linalg.matrix_norm(q, ord=2).max()))
            qf = float(rotation_norm_max(layer))
            before = layer(x)
            layer.merge_()
            after = layer(x)
        rows.append({"part": "merge_step", "n": n, "block": block, "q_fro_max": round(qf, 4),
                     "q2_max": round(q2, 4), "bound_2q4": 2 * q2 ** 4,
                     "rel_output_change": float((after - before).norm() / before.norm())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("qnorm", "drift", "merge_step", "all"), default="all")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--merge-every", type=int, default=None)
    ap.add_argument("--conventions", default="5e-3:1e-8:reset,2.5e-3:1e-6:reset,2.5e-3:1e-6:rewarm",
                    help="poet_lr:poet_eps:restart, comma separated")
    ap.add_argument("--q-scales", default="0.005,0.02",
                    help="std of the random skew entries in the drift part, comma separated")
    ap.add_argument("--max-q-norm", type=float, default=0.0, help="guard (0: off)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    env = environment()
    rows = []
    if args.part in ("merge_step", "all"):
        rows += merge_step(512, 256)
        print_table(rows[-5:], ["q_fro_max", "q2_max", "bound_2q4", "rel_output_change"])
    if args.part in ("drift", "all"):
        for q_scale in args.q_scales.split(","):
            rows += drift(1376, 256, 256, 50, float(q_scale))
        print_table([r for r in rows if r["part"] == "drift"],
                    ["w0", "merge", "q_fro_mean", "q2_mean", "sigma_max_ratio", "sigma_min_ratio",
                     "max_rel_sv_change", "rel_dist_to_exact"])
    if args.part in ("qnorm", "all"):
        for conv in args.conventions.split(","):
            lr, eps, restart = conv.split(":")
            row = run_training(args.preset, args.steps, float(lr), float(eps), restart,
                               args.batch_size, args.seq_len, args.merge_every, args.vocab_size,
                               args.max_q_norm)
            rows.append(row)
            short = {k: v for k, v in row.items() if k not in ("losses", "q_fro")}
            print(json.dumps(short), flush=True)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if not any(
        r.get("part") == n.get("part") and r.get("preset", None) == n.get("preset", None)
        and r.get("poet_lr") == n.get("poet_lr") and r.get("poet_eps") == n.get("poet_eps")
        and r.get("restart") == n.get("restart") and r.get("w0") == n.get("w0")
        and r.get("max_q_norm") == n.get("max_q_norm")
        and r.get("q_fro_mean") == n.get("q_fro_mean")
        and r.get("merge") == n.get("merge") and r.get("q_fro_max") == n.get("q_fro_max")
        for n in rows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(keep + [{**env, **r} for r in rows], indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
