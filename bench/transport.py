"""How to bring the debian-en corpus to the GPU machine: xz token ids or xz text?

Packs the installed corpus both ways (``poetx.data.transport.pack``), unpacks each into a
scratch copy and times it, and writes ``bench/results/gpu_corpus.json``: packed MiB, bytes per
token, pack and unpack seconds on this machine's cores, and how many training tokens fit in a
call's 64 MiB with ``--reserve-mib`` kept for code.

    python bench/transport.py --train-tokens 30000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import environment, print_table, write_json
from poetx.data import debian_en
from poetx.data.transport import pack, unpack

CALL_MIB = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-tokens", type=int, default=30_000_000)
    parser.add_argument("--reserve-mib", type=float, default=15.0,
                        help="MiB of a call kept for code and everything else")
    parser.add_argument("--out", default="bench/results/gpu_corpus.json")
    args = parser.parse_args(argv)
    corpus = debian_en.ensure_installed()
    rows = []
    for fmt in ("tokens", "text"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / fmt
            info = pack(corpus, folder, args.train_tokens, fmt)
            start = time.perf_counter()
            unpack(folder)
            unpack_s = time.perf_counter() - start
            train = info["splits"]["train"]
            val = info["splits"]["val"]
            per_token = train["packed_bytes"] / train["tokens"]
            room = (CALL_MIB - args.reserve_mib) * 2**20 - val["packed_bytes"] \
                - (folder / "tokenizer.json").stat().st_size
            rows.append({
                "format": fmt,
                "train_tokens": train["tokens"], "val_tokens": val["tokens"],
                "train_mib": train["packed_bytes"] / 2**20,
                "val_mib": val["packed_bytes"] / 2**20,
                "total_mib": info["packed_bytes"] / 2**20,
                "bytes_per_token": per_token,
                "pack_s": info["pack_seconds"], "unpack_s": unpack_s,
                "cores": os.cpu_count(),
                "train_tokens_in_call": int(room / per_token),
                "reserve_mib": args.reserve_mib,
            })
            shutil.rmtree(folder)
    print_table(rows, ["format", "train_tokens", "train_mib", "val_mib", "total_mib",
                       "bytes_per_token", "pack_s", "unpack_s", "train_tokens_in_call"])
    write_json(args.out, rows, {**environment(), "device": "cpu (this machine)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
