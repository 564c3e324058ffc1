"""Does 8-bit Adam state for the rotations cost quality? Two ``poetx train`` runs, equal but for
``--rotation-states fp32|8bit`` (embedding and lm_head on ``adamw8bit`` in both), on CPU.

    python -m bench.lowbit_quality --preset tiny --steps 200 --block-size 32 --quant-block 16 \
        --out bench/results/lowbit_quality.json

``--quant-block``: torchao's quantization block (values per scale; 256 in training runs). A
small model's rotation tensors are rarely multiples of 256 values, and torchao keeps float32
states for those (and for any tensor under 4096 values); a block of 16 makes tiny's rotation
tensors of the intermediate side (11 blocks of 32: 5456 values) 8-bit, those of the hidden side
(4 blocks, 1984 values) stay float32. The run prints which share of the rotation values had
8-bit states.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import environment, print_table, write_json


def _lowbit_share(preset: str, block_size: int, quant_block: int) -> float:
    """Share of the rotation values whose tensors get 8-bit states (torchao's rule)."""
    from poetx.plan.memory import _layer_theta_sizes, shape_of

    sizes = _layer_theta_sizes(shape_of(preset).linears(), block_size)
    eligible = sum(s for s in sizes if s >= 4096 and s % quant_block == 0)
    return eligible / sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--quant-block", type=int, default=16)
    parser.add_argument("--out", default="bench/results/lowbit_quality.json")
    args = parser.parse_args()

    from poetx.optim import dense_update
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train
    from poetx.train.metrics import read_metrics

    dense_update.LOWBIT_BLOCK_SIZE = args.quant_block
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for states in ("fp32", "8bit"):
            out = Path(tmp) / states
            cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, dense_optimizer="adamw8bit",
                              rotation_states=states, eval_every=max(1, args.steps // 3),
                              save_every=0, progress=False, tensorboard=False, out=str(out),
                              poet={"block_size": args.block_size})
            train(cfg)
            records = read_metrics(out)
            evals = [r for r in records if r["type"] == "eval"]
            train_rows = [r for r in records if r["type"] == "train"]
            tail = [r["loss"] for r in train_rows[-10:]]
            rows.append({"preset": args.preset, "rotation_states": states,
                         "steps": args.steps, "tokens_per_step": cfg.tokens_per_step,
                         "lowbit_share": _lowbit_share(args.preset, args.block_size,
                                                       args.quant_block),
                         "block_size": args.block_size, "quant_block": args.quant_block,
                         "val_loss": evals[-1]["val_loss"],
                         "val_losses": [(e["step"], e["val_loss"]) for e in evals],
                         "train_loss_last10": sum(tail) / len(tail)})
    write_json(args.out, rows, environment())
    print_table(rows, ["preset", "rotation_states", "steps", "val_loss", "train_loss_last10"])


if __name__ == "__main__":
    main()
