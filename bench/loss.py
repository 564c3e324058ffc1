"""Cross-entropy of the LM head, forward+backward: poetx's chunked loss (logits kept or
recomputed) vs Liger-Kernel's fused
linear cross-entropy vs full float32 logits (bf16 inputs, CUDA-event median, peak memory above
the inputs, relative error of the loss and both gradients against float32 full logits).

Liger is optional (``pip install liger-kernel``); it syncs with the host once per call
(``target_mask.sum().item()``), so it cannot be recorded in a CUDA graph, which a capturable
step needs; this table says what the chunked loss gives up or gains against it.

    python -m bench.loss --out bench/results/loss.json
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from bench.common import environment, print_table, write_json
from poetx.model.lm_loss import auto_chunk_tokens, chunked_cross_entropy

CASES = {"llama-8b 1x1024": (1024, 4096, 128256), "llama-8b 2x2048": (4096, 4096, 128256),
         "llama-130m 16x512": (8192, 768, 32000)}


def _impls():
    impls = {
        # the batch's logits kept for backward where they fit (the default) ...
        "chunked": lambda h, w, t: chunked_cross_entropy(h, w, t, auto_chunk_tokens(w.shape[0])),
        # ... and recomputed in vocabulary chunks (larger batches)
        "chunked-recompute": lambda h, w, t: chunked_cross_entropy(
            h, w, t, auto_chunk_tokens(w.shape[0]), keep_logits_bytes=0),
        "full_fp32_logits": lambda h, w, t: torch.nn.functional.cross_entropy(
            (h @ w.t()).float(), t),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        impls["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)
    except ImportError as exc:
        print(f"liger-kernel not importable ({exc}); skipped")
    return impls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/loss.json")
    args = parser.parse_args()
    rows = []
    for case, (tokens, hidden, vocab) in CASES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        h0 = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
        w0 = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
        t = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
        hr, wr = h0.float().requires_grad_(), w0.float().requires_grad_()
        ref = torch.nn.functional.cross_entropy(hr @ wr.t(), t)
        ref.backward()
        for name, fn in _impls().items():
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()

            def run(fn=fn, h=h, w=w, t=t):
                h.grad = w.grad = None
                fn(h, w, t).backward()

            row = {"case": case, "impl": name}
            try:
                loss = fn(h, w, t)
                loss.backward()
                row.update(loss_rel_err=rel(loss.detach().float(), ref.detach()),
                           grad_h_rel_err=rel(h.grad, hr.grad), grad_w_rel_err=rel(w.grad, wr.grad))
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run()
                torch.cuda.synchronize()
                row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                row["ms"] = do_bench(run, warmup=50, rep=300, return_mode="median")
                row["status"] = "ok"
            except torch.OutOfMemoryError:
                row["status"] = "oom"
            rows.append(row)
            h.grad = w.grad = None
            torch.cuda.empty_cache()
        del hr, wr, ref
        torch.cuda.empty_cache()
    env = environment()
    write_json(args.out, rows, env)
    print_table(rows, ["case", "impl", "status", "ms", "extra_peak_gib", "loss_rel_err",
                       "grad_h_rel_err", "grad_w_rel_err"])


if __name__ == "__main__":
    main()
