"""The ``poetx`` command: ``train``, ``plan``, ``eval``, ``export``, ``plot``, ``data``.

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
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130


def _add_train(sub: argparse._SubParsersAction) -> None:
    from poetx.cli.flags import add_settings_flags
    from poetx.config import POETConfig
    from poetx.train.config import TrainConfig

    p = sub.add_parser(
        "train", help="train a model (POET-X or the AdamW baseline)",
        description="Train a Llama preset with POET-X or plain AdamW through one loop. "
        "Unset flags come from --config (TOML), else from the preset's defaults. Every "
        "setting of the run's config.json has a flag.",
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="TOML",
                   help="TOML file of settings (keys as in the run's config.json, POET ones in "
                   "a [poet] table); flags override it")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or CHECKPOINT)")
    flags = add_settings_flags(p, TrainConfig, nested={"poet": POETConfig})
    p.set_defaults(func=_cmd_train, settings_flags=flags)


def _setting_type(field: str):
    from poetx.cli.flags import value_parser
    from poetx.train.config import TrainConfig

    return value_parser(TrainConfig, field)


def _cmd_train(args: argparse.Namespace) -> int:
    from poetx.cli.flags import collect_settings
    from poetx.train.loop import train
    from poetx.train.run_dir import config_from_sources

    overrides = collect_settings(args, args.settings_flags)
    cfg, resume_from = config_from_sources(args.config, overrides, args.resume)
    train(cfg, resume_from)
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from poetx.data.dataset import build_data
    from poetx.train.evaluate import evaluate
    from poetx.train.run_dir import TOKENIZER_FILE
    from poetx.train.saved_run import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, action="evaluate")
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


CORPORA = ("shakespeare", "debian-en")


def _cmd_data_install(args: argparse.Namespace) -> int:
    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.name == "debian-en":
        from poetx.data.debian_en import install_corpus
    else:
        from poetx.data.corpus import install_corpus
    install_corpus(cache)
    return EXIT_OK


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from poetx.data import debian_en
    from poetx.data.transport import pack

    cache = Path(args.cache_dir) if args.cache_dir else None
    info = pack(debian_en.ensure_installed(cache), Path(args.out), args.train_tokens,
                args.format)
    for split, entry in info["splits"].items():
        print(f"{split}: {entry['tokens']:,} tokens, {entry['documents']:,} documents, "
              f"{entry['file']} {entry['packed_bytes'] / 2**20:.1f} MiB")
    print(f"{args.out}: {info['packed_bytes'] / 2**20:.1f} MiB in all "
          f"({info['pack_seconds']:.0f} s); unpack with `poetx data unpack {args.out}`")
    return EXIT_OK


def _cmd_data_unpack(args: argparse.Namespace) -> int:
    from poetx.data.transport import unpack

    timings = unpack(Path(args.folder))
    done = ", ".join(f"{split} {seconds:.1f} s" for split, seconds in timings.items())
    print(f"{args.folder}: token files ready ({done or 'already unpacked'})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poetx", description="Memory-efficient LLM pretraining with POET-X.",
        epilog="Set POETX_DEBUG=1 to see tracebacks of errors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    from poetx.cli.plan import add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("eval", help="validation loss and perplexity of a run's checkpoint")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: newest)")
    p.add_argument("--data", metavar="PATH", help="evaluate on other data (run's tokenizer)")
    p.add_argument("--eval-batches", type=_setting_type("eval_batches"),
                   help="validation batches to use")
    p.add_argument("--device", type=_setting_type("device"), default="auto",
                   help="auto (default), cpu, cuda, cuda:N")
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
    q = data_sub.add_parser(
        "install", help="download, verify and prepare a corpus",
        description="shakespeare: the bundled corpus (2.6 M tokens). debian-en: English "
        "documentation, books and dictionaries from pinned Debian packages (apt-get), cleaned, "
        "de-duplicated, split and tokenized (about 20 minutes on 2 cores; 2.4 GB of packages).")
    q.add_argument("name", nargs="?", default="shakespeare", choices=CORPORA,
                   help="corpus (default shakespeare)")
    q.add_argument("--cache-dir", metavar="DIR", help="data cache (default $POETX_DATA_DIR)")
    q.set_defaults(func=_cmd_data_install)
    q = data_sub.add_parser(
        "pack", help="compress a corpus's tokens for a machine without network",
        description="Write the first whole documents of the training stream (at most "
        "--train-tokens) and the whole validation stream, xz-compressed, with the tokenizer.")
    q.add_argument("name", choices=("debian-en",), help="corpus")
    q.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    q.add_argument("--train-tokens", type=int, default=30_000_000, metavar="N",
                   help="training tokens to pack (default 30,000,000)")
    q.add_argument("--format", choices=("tokens", "text"), default="tokens",
                   help="tokens: uint16 ids (default); text: documents, tokenized on unpack")
    q.add_argument("--cache-dir", metavar="DIR", help="data cache (default $POETX_DATA_DIR)")
    q.set_defaults(func=_cmd_data_pack)
    q = data_sub.add_parser("unpack", help="turn a packed folder into token files, checked")
    q.add_argument("folder", metavar="DIR")
    q.set_defaults(func=_cmd_data_unpack)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from poetx.cli.plot import MissingExtraError
    from poetx.data.corpus import CorpusUnavailableError
    from poetx.data.debian import PackageUnavailableError
    from poetx.train.checkpoint import CheckpointError
    from poetx.train.loop import TrainError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, FileExistsError, CheckpointError, TrainError,
            CorpusUnavailableError, PackageUnavailableError, MissingExtraError)


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
