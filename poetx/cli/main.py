"""The ``poetx`` command: ``train``, ``eval``, ``export``, ``plot``, ``data install``.

Errors the user can act on (bad values, missing files, unusable checkpoints, NaN, OOM) print
one ``poetx: error: ...`` line and exit non-zero without a traceback; ``POETX_DEBUG=1`` shows
the traceback. Exit codes: 0 success, 1 error, 2 bad command line, 3 non-finite loss or
gradient, 130 interrupted (a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130


# argument types: argparse turns their ValueError/ArgumentTypeError into a usage error ---------
def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what} (at least {low}), got {value}")
        return value

    return parse


def _float_range(positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < 0 or (positive and value == 0):
            kind = "positive" if positive else "non-negative"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text}")
        return value

    return parse


_POSITIVE_INT = _int_at_least(1, "positive")
_NONNEG_INT = _int_at_least(0, "non-negative")
_POSITIVE_FLOAT = _float_range(positive=True)
_NONNEG_FLOAT = _float_range(positive=False)


def _device(text: str) -> str:
    from poetx.train.config import DEVICE_RE

    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


# flags of "train" -> (TrainConfig field, nested in "poet"?) -----------------------------------
_TRAIN_FIELDS: dict[str, tuple[str, bool]] = {
    "preset": ("preset", False),
    "optimizer": ("optimizer", False),
    "data": ("data", False),
    "tokenizer": ("tokenizer", False),
    "init_from": ("init_from", False),
    "vocab_size": ("vocab_size", False),
    "cache_dir": ("cache_dir", False),
    "steps": ("steps", False),
    "batch_size": ("batch_size", False),
    "seq_len": ("seq_len", False),
    "lr": ("lr", False),
    "poet_lr": ("poet_lr", False),
    "weight_decay": ("weight_decay", False),
    "warmup_steps": ("warmup_steps", False),
    "min_lr_ratio": ("min_lr_ratio", False),
    "max_grad_norm": ("max_grad_norm", False),
    "clip_warmup_steps": ("clip_warmup_steps", False),
    "eval_every": ("eval_every", False),
    "eval_batches": ("eval_batches", False),
    "save_every": ("save_every", False),
    "keep_last": ("keep_last", False),
    "out": ("out", False),
    "seed": ("seed", False),
    "device": ("device", False),
    "dtype": ("dtype", False),
    "grad_checkpointing": ("grad_checkpointing", False),
    "skip_nonfinite": ("skip_nonfinite", False),
    "progress": ("progress", False),
    "tensorboard": ("tensorboard", False),
    "block_size": ("block_size", True),
    "merge_every": ("merge_every", True),
    "mode": ("mode", True),
    "w0_format": ("w0_format", True),
    "neumann_terms": ("neumann_terms", True),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    from poetx.config import MODES, W0_FORMATS
    from poetx.model.llama import preset_names
    from poetx.train.config import DTYPES, OPTIMIZERS

    p = sub.add_parser(
        "train", help="train a model (POET-X or the AdamW baseline)",
        description="Train a Llama preset with POET-X or plain AdamW through one loop. "
        "Unset flags come from --config (TOML), else from the preset's defaults.",
    )
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=preset_names(), help="model shape (default tiny)")
    g.add_argument("--config", metavar="TOML",
                   help="TOML file of settings (keys as in the run's config.json, POET ones in "
                   "a [poet] table); flags override it")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="poetx (default) or adamw")
    g.add_argument("--out", metavar="RUN_DIR",
                   help="run directory (default runs/<preset>-<optimizer>)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or CHECKPOINT)")
    g.add_argument("--init-from", metavar="HF_DIR",
                   help="continue pretraining a Hugging Face causal LM folder: its weights "
                   "(POET init 'keep') and its tokenizer.json")
    g.add_argument("--seed", type=_NONNEG_INT, help="seed of model init, data order, rotations")
    g.add_argument("--device", type=_device, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=DTYPES, help="auto = bf16 on CUDA, float32 on CPU")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="text/jsonl/token file or folder, or hf:NAME (default: bundled corpus)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json to use instead of training")
    g.add_argument("--vocab-size", type=_int_at_least(2, "at least 2"),
                   help="vocabulary of the tokenizer trained for the run")
    g.add_argument("--cache-dir", metavar="DIR", help="data cache (default $POETX_DATA_DIR)")
    g.add_argument("--batch-size", type=_POSITIVE_INT, help="sequences per step")
    g.add_argument("--seq-len", type=_int_at_least(2, "at least 2"), help="tokens per sequence")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=_POSITIVE_INT, help="optimizer steps")
    g.add_argument("--lr", type=_POSITIVE_FLOAT, help="learning rate of ordinary parameters")
    g.add_argument("--poet-lr", type=_POSITIVE_FLOAT, help="learning rate of the rotations")
    g.add_argument("--weight-decay", type=_NONNEG_FLOAT, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=_NONNEG_INT, help="linear warm-up steps")
    g.add_argument("--min-lr-ratio", type=_NONNEG_FLOAT, help="cosine floor as a fraction of lr")
    g.add_argument("--max-grad-norm", type=_NONNEG_FLOAT, help="gradient clipping (0 = off)")
    g.add_argument("--clip-warmup-steps", type=_NONNEG_INT,
                   help="steps to ramp the clipping threshold back up after a merge")
    g.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction, default=None,
                   help="skip steps with NaN/inf loss or gradient instead of stopping")
    g = p.add_argument_group("POET-X")
    g.add_argument("--block-size", type=_int_at_least(2, "at least 2"),
                   help="rotation block size b")
    g.add_argument("--merge-every", type=_POSITIVE_INT, help="merge period T in steps")
    g.add_argument("--mode", choices=MODES, help="fast (store intermediate) or mem (recompute)")
    g.add_argument("--w0-format", choices=W0_FORMATS, help="storage of the frozen weights")
    g.add_argument("--neumann-terms", type=_POSITIVE_INT, help="Neumann series terms")
    g = p.add_argument_group("memory")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing of the decoder blocks")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--eval-every", type=_NONNEG_INT, help="evaluate every N steps (0 = at end)")
    g.add_argument("--eval-batches", type=_POSITIVE_INT, help="validation batches to use")
    g.add_argument("--save-every", type=_NONNEG_INT, help="checkpoint every N steps (0 = at end)")
    g.add_argument("--keep-last", type=_POSITIVE_INT, help="checkpoints to keep")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default on)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard event files when tensorboard is installed (default on)")
    p.set_defaults(func=_cmd_train)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    poet: dict[str, Any] = {}
    for attr, (name, nested) in _TRAIN_FIELDS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        (poet if nested else overrides)[name] = value
    if poet:
        overrides["poet"] = poet
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from poetx.train.loop import config_from_sources, train

    cfg, resume_from = config_from_sources(args.config, _train_overrides(args), args.resume)
    train(cfg, resume_from)
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from poetx.data.dataset import build_data
    from poetx.train.evaluate import evaluate
    from poetx.train.runs import TOKENIZER_FILE, load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device)
    cfg = run.config
    tokenizer = Path(args.run_dir) / TOKENIZER_FILE
    if not tokenizer.is_file():
        tokenizer = None
    data = build_data(
        args.data or cfg.data, cfg.seq_len, cfg.batch_size, cfg.seed, vocab_size=cfg.vocab_size,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, tokenizer_path=tokenizer,
    )
    result = evaluate(run.model, data.val, run.device, args.eval_batches or cfg.eval_batches)
    report = {"checkpoint": str(run.checkpoint), "step": run.state["step"], **result}
    print(json.dumps(report))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from poetx.cli.export import export_run

    dest = export_run(args.run_dir, args.dest, args.checkpoint, args.dtype, force=args.force)
    print(f"exported to {dest} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from poetx.cli.plot import plot_runs

    written = plot_runs(args.run_dirs, args.out, spectrum=args.spectrum)
    for path in written:
        print(path)
    return EXIT_OK


def _cmd_data_install(args: argparse.Namespace) -> int:
    from poetx.data.corpus import install_corpus

    install_corpus(Path(args.cache_dir) if args.cache_dir else None)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poetx", description="Memory-efficient LLM pretraining with POET-X.",
        epilog="Set POETX_DEBUG=1 to see tracebacks of errors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)

    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: newest)")
    p.add_argument("--data", metavar="PATH", help="evaluate on other data (run's tokenizer)")
    p.add_argument("--eval-batches", type=_POSITIVE_INT, help="validation batches to use")
    p.add_argument("--device", type=_device, default="auto")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="merge the rotations and write a plain HF checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: newest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="dtype of the exported weights (default: the run's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DEST")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("plot", help="loss / perplexity curves and POET spectra as PNGs")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    p.add_argument("--out", metavar="PNG_DIR", required=True, help="folder for the PNG files")
    p.add_argument("--spectrum", action=argparse.BooleanOptionalAction, default=True,
                   help="singular-value spectra from the newest checkpoints (default on)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("install", help="download and verify the bundled corpus")
    q.add_argument("--cache-dir", metavar="DIR", help="data cache (default $POETX_DATA_DIR)")
    q.set_defaults(func=_cmd_data_install)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from poetx.data.corpus import CorpusUnavailableError
    from poetx.train.checkpoint import CheckpointError
    from poetx.train.loop import TrainError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, FileExistsError, CheckpointError, TrainError,
            CorpusUnavailableError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    debug = os.environ.get("POETX_DEBUG", "") not in ("", "0")
    from poetx.train.loop import NonFiniteError, TrainInterrupted

    try:
        return args.func(args)
    except TrainInterrupted as e:
        print(f"poetx: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        print("poetx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteError as e:
        if debug:
            raise
        print(f"poetx: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except _known_errors() as e:
        if debug:
            raise
        print(f"poetx: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
