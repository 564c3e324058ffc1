"""Model-level benchmark: peak memory and tokens/s of poetx variants and plain AdamW.

Each (model, method) runs in its own process, so one OOM or allocator state does not leak into
the next; inside it, sequence lengths run from short to long on the same model and optimizer.
Each step is the step ``poetx train`` runs: replayed as one CUDA graph where it is (torch's
fused AdamW, capturable), eager for the other optimizers; ``--no-cuda-graphs`` times eager
steps, as the rows measured before issue 10 did (their ``cuda_graphs`` is absent).

    python -m bench.model --models llama-3b,llama-8b,llama-13b --seqs 512,1024,2048 \
        --methods adamw,fast,mem-ckpt,int8,fp8 --out bench/results/model.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from bench.common import environment, print_table, write_json
from poetx.model.lm_loss import PLANNER_LOSS


@dataclass(frozen=True)
class Method:
    poetx: bool
    mode: str = "fast"
    w0_format: str = "auto"
    checkpointing: bool = False
    dense_optimizer: str = "adamw"
    rotation_states: str = "fp32"
    step_in_backward: bool = False
    mlp_permutations: str = "independent"
    mlp_frames: str = "fused"


_LEAN = {"dense_optimizer": "adamw8bit", "step_in_backward": True}
METHODS = {
    "adamw": Method(poetx=False),
    "adamw-ckpt": Method(poetx=False, checkpointing=True),
    "fast": Method(poetx=True, mode="fast"),
    "mem": Method(poetx=True, mode="mem"),
    "mem-ckpt": Method(poetx=True, mode="mem", checkpointing=True),
    "int8": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True),
    "fp8": Method(poetx=True, mode="mem", w0_format="fp8", checkpointing=True),
    # int8 with the dense-parameter optimizers of poetx.optim.dense_update
    "int8-kahan": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True,
                         dense_optimizer="adamw-kahan"),
    "int8-master": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True,
                          dense_optimizer="adamw-fp32-master"),
    "int8-8bit": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True,
                        dense_optimizer="adamw8bit"),
    # the memory options of issue 13: 8-bit embedding/head states stepped in backward, then
    # 8-bit rotation states too ("lean")
    "mem-ckpt-8bit-inbwd": Method(poetx=True, mode="mem", checkpointing=True, **_LEAN),
    "mem-ckpt-lean": Method(poetx=True, mode="mem", checkpointing=True, rotation_states="8bit",
                            **_LEAN),
    "int8-8bit-inbwd": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True,
                              **_LEAN),
    "int8-lean": Method(poetx=True, mode="mem", w0_format="int8", checkpointing=True,
                        rotation_states="8bit", **_LEAN),
}


def build(preset: str, method: Method, block_size: int, device: str, capturable: bool = False):
    from transformers import LlamaForCausalLM

    import poetx
    from poetx.model.build import build_poet_model, rebuild_hf_rotary
    from poetx.model.llama import build_model, llama_config

    if not method.poetx:
        model = build_model(preset, dtype=torch.bfloat16, device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda", capturable=capturable)
    else:
        cfg = poetx.POETConfig(block_size=block_size, mode=method.mode, w0_format=method.w0_format,
                               mlp_permutations=method.mlp_permutations,
                               mlp_frames=method.mlp_frames)
        model = build_poet_model(lambda: LlamaForCausalLM(llama_config(preset)), cfg, device,
                                 torch.bfloat16, rebuild_buffers=rebuild_hf_rotary)
        opt = poetx.make_optimizer(model, lr=1e-4, poet_lr=1e-4,
                                   dense_optimizer=method.dense_optimizer,
                                   rotation_8bit=method.rotation_states == "8bit",
                                   capturable=capturable)
    if method.step_in_backward:
        from poetx.optim.in_backward import StepInBackward, embedding_and_head

        # no clipping, as the other rows (max_norm 0)
        model._step_in_backward = StepInBackward(opt, embedding_and_head(model), 0.0)
    if method.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, opt


def capturable(method: Method) -> bool:
    """Whether ``poetx train`` replays this method's step as a CUDA graph (torch's fused AdamW
    only; the step in backward is left eager here, as its hook needs ``begin`` per step)."""
    return (method.dense_optimizer == "adamw" and method.rotation_states == "fp32"
            and not method.step_in_backward)


def make_train_step(model, opt, batch: torch.Tensor, warmup: int, capture: bool,
                    compile_blocks: bool = True):
    """``batch -> (loss, grad_norm)``: the plain step, or (``capture``, a CUDA batch) its
    CUDA-graph replay recorded after ``warmup - 1`` eager steps, as ``poetx train`` runs it
    (with ``compile_blocks``, the decoder blocks compiled around the POET layers)."""
    from poetx.model.compile_blocks import compile_blocks as compile_around
    from poetx.model.lm_loss import causal_lm_loss
    from poetx.train.capture import CapturedStep, train_step

    if capture and compile_blocks:
        compile_around(model)
    step = train_step(model, opt, causal_lm_loss)
    if not capture:
        return step
    return CapturedStep(step, batch, warmup=max(1, warmup - 1),
                        release=lambda: opt.zero_grad(set_to_none=True))


def worker(args: argparse.Namespace) -> None:
    from poetx.model.lm_loss import causal_lm_loss

    method = METHODS[args.method]
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphs = args.cuda_graphs and cuda and capturable(method)
    model, opt = build(args.models, method, args.block_size, args.device, capturable=graphs)
    vocab = model.config.vocab_size
    env = environment()
    for seq in [int(s) for s in args.seqs.split(",")]:
        row = {"model": args.models, "seq_len": seq, "batch": args.batch, "method": args.method,
               "block_size": args.block_size if method.poetx else None,
               "loss_impl": PLANNER_LOSS,
               "cuda_graphs": graphs,
               # make_train_step compiles the decoder blocks of a captured poetx step, as
               # poetx train does: not under checkpointing, which disables dynamo
               "compile_blocks": graphs and method.poetx and not method.checkpointing,
               "mlp_frames": method.mlp_frames if method.poetx else None,
               "device": env["device"], "command": " ".join(["python -m bench.model",
                                                              *sys.argv[1:]])}
        try:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            batch = torch.randint(0, vocab, (args.batch, seq + 1), device=args.device)
            train_step = make_train_step(model, opt, batch, args.warmup, graphs,
                                         compile_blocks=row["compile_blocks"])
            times = []
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                if method.step_in_backward:
                    loss = causal_lm_loss(model, batch)
                    model._step_in_backward.begin(loss)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    loss, _ = train_step(batch)
                sync()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
            step_s = sorted(times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            row.update(status="ok", peak_gib=peak,
                       tokens_per_s=args.batch * seq / step_s, step_s=step_s,
                       loss=float(loss))
        except torch.OutOfMemoryError:
            row.update(status="oom", peak_gib=None, tokens_per_s=None)
            opt.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()
        print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3b,llama-8b,llama-13b")
    parser.add_argument("--seqs", default="512,1024,2048")
    parser.add_argument("--methods", default="adamw,fast,mem-ckpt,int8,fp8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/model.json")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="replay the step as a CUDA graph where poetx train does (torch's "
                        "fused AdamW); --no-cuda-graphs: eager steps, as rows before issue 10")
    args = parser.parse_args()
    if args.method:
        return worker(args)
    env = environment()
    rows = []
    for preset in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "bench.model", "--models", preset, "--method", method,
                   "--seqs", args.seqs, "--batch", str(args.batch), "--block-size",
                   str(args.block_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--device", args.device, "--timeout", str(args.timeout),
                   "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                out, err = proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as exc:
                out, err = exc.stdout or "", "timeout"
                if isinstance(out, bytes):
                    out = out.decode()
            got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
            seen = {r["seq_len"] for r in got}
            for seq in [int(s) for s in args.seqs.split(",")]:
                if seq not in seen:
                    status = "oom" if "OutOfMemoryError" in err else "error"
                    got.append({"model": preset, "seq_len": seq, "batch": args.batch,
                                "method": method, "status": status, "peak_gib": None,
                                "tokens_per_s": None, "error": err[-400:]})
            rows.extend(sorted(got, key=lambda r: r["seq_len"]))
            write_json(args.out, rows, env)
            for r in got:
                print(f"{preset} {method} seq={r['seq_len']} {r['status']} "
                      f"peak={r.get('peak_gib')} tok/s={r.get('tokens_per_s')}", flush=True)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}")
    print_table(rows, ["model", "seq_len", "method", "status", "peak_gib", "tokens_per_s"])


if __name__ == "__main__":
    main()
