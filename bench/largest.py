"""The largest Llama-style model that trains on one GPU: real optimizer steps on real text.

    python -m bench.largest --shape llama-30b --w0-format int8 --steps 10 \
        --out bench/results/largest.json
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from bench.common import environment, print_table, write_json
from poetx.data.dataset import build_data
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.lm_loss import causal_lm_loss

# hidden, intermediate, layers, heads (LLaMA-1 30B/65B-style shapes; kv heads = heads)
SHAPES = {
    "llama-13b": (5120, 13824, 40, 40),
    "llama-30b": (6656, 17920, 60, 52),
    "llama-34b": (8192, 22016, 48, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-30b", choices=sorted(SHAPES))
    parser.add_argument("--w0-format", default="int8", choices=["auto", "int8", "fp8"])
    parser.add_argument("--mode", default="mem")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=16384)
    # Adam moves every lm_head entry by about lr per step, so a logit moves by about
    # lr * hidden: 3e-3 at width 6656 diverged (bench/results/largest_lr3e-3_diverged.json).
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--poet-lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=3, help="linear lr warm-up steps")
    # the memory options of poetx train (see `poetx plan`)
    parser.add_argument("--dense-optimizer", default="adamw",
                        choices=["adamw", "adamw-kahan", "adamw-fp32-master", "adamw8bit"])
    parser.add_argument("--rotation-states", default="fp32", choices=["fp32", "8bit"])
    parser.add_argument("--step-in-backward", action="store_true",
                        help="embedding and lm_head stepped in backward, clipped per tensor")
    parser.add_argument("--out", default="bench/results/largest.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = build_data(None, args.seq_len, args.batch, seed=0, vocab_size=args.vocab_size)
    hidden, inter, layers, heads = SHAPES[args.shape]
    hf_config = LlamaConfig(vocab_size=data.vocab_size, hidden_size=hidden,
                            intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads,
                            max_position_embeddings=4096, use_cache=False)
    cfg = poetx.POETConfig(block_size=args.block_size, mode=args.mode, w0_format=args.w0_format)
    start = time.perf_counter()
    model = build_poet_model(lambda: LlamaForCausalLM(hf_config), cfg, "cuda", torch.bfloat16,
                             rebuild_buffers=rebuild_hf_rotary)
    build_s = time.perf_counter() - start
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = poetx.make_optimizer(model, lr=args.lr, poet_lr=args.poet_lr,
                               dense_optimizer=args.dense_optimizer,
                               rotation_8bit=args.rotation_states == "8bit")
    in_backward = None
    if args.step_in_backward:
        from poetx.optim.in_backward import StepInBackward, embedding_and_head

        in_backward = StepInBackward(opt, embedding_and_head(model), 1.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    dense_params = sum(
        m.in_features * m.out_features for _, m in poetx.model.wrap.poet_layers(model)
    ) + sum(p.numel() for n, p in model.named_parameters() if "theta" not in n and "w0" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.shape}: {dense_params / 1e9:.2f}B parameters as a dense model, "
          f"{trainable / 1e6:.0f}M trainable; built in {build_s:.1f} s; {data.description}")
    rows = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, data.train.batch(step).cuda())
        if in_backward is not None:
            in_backward.begin(loss)
        loss.backward()
        # the parameters stepped in backward were clipped on their own (their grads are None)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"shape": args.shape, "step": step, "loss": loss.item(),
                     "tokens_per_s": args.batch * args.seq_len / dt,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "dense_params_b": dense_params / 1e9, "trainable_m": trainable / 1e6,
                     "w0_format": args.w0_format, "mode": args.mode, "lr": args.lr,
                     "poet_lr": args.poet_lr, "dense_optimizer": args.dense_optimizer,
                     "rotation_states": args.rotation_states,
                     "step_in_backward": args.step_in_backward, "loss_impl": "vocab-chunked",
                     "batch": args.batch, "seq_len": args.seq_len})
        print(f"step {step}: loss {rows[-1]['loss']:.4f}  {rows[-1]['tokens_per_s']:.0f} tok/s  "
              f"peak {rows[-1]['peak_gib']:.1f} GiB", flush=True)
    env = environment()
    write_json(args.out, rows, env)
    print(f"\n{env['device']}, torch {env['torch']}")
    print_table(rows, ["shape", "step", "loss", "tokens_per_s", "peak_gib"])


if __name__ == "__main__":
    main()
