"""GPU check of the framework integrations (issue 16), not a speed claim.

For each setting: HF ``Trainer`` with ``poetx.POETAdamW`` (fused on CUDA) for 30 steps with 3
merges, the same run resumed from its step-15 checkpoint on a fresh model (max abs difference
of every state tensor against the unbroken run), and the dense export's logits against the POET
model's. Then an ``accelerate`` loop with ``mixed_precision="bf16"``.

    python3 -m bench.integrations --out bench/results/integrations.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import poetx
from bench.common import environment, print_table, write_json
from poetx import POETAdamW, POETConfig
from poetx.integrations.transformers import save_pretrained_merged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to try the script
CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=128, tie_word_embeddings=True)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 512, (n, 128), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG).to(DEVICE, dtype)
    return poetx.wrap(model, POETConfig(block_size=64, merge_every=10))


def trainer(model: torch.nn.Module, out: str, **kwargs) -> tuple[Trainer, POETAdamW]:
    opt = POETAdamW(model, lr=3e-3, poet_lr=1e-3, max_grad_norm=1.0, clip_warmup_steps=2)
    args = TrainingArguments(output_dir=out, max_steps=30, per_device_train_batch_size=8,
                             save_steps=15, report_to=[], logging_steps=10, disable_tqdm=True,
                             lr_scheduler_type="cosine", max_grad_norm=0.0,
                             use_cpu=DEVICE == "cpu", **kwargs)
    return Trainer(model=model, args=args, train_dataset=Tokens(240),
                   optimizers=(opt, None)), opt


def trainer_row(case: str, dtype: torch.dtype, tmp: str, **kwargs) -> dict:
    model = make(0, dtype)
    t, opt = trainer(model, f"{tmp}/{case}-a", **kwargs)
    start = time.perf_counter()
    result = t.train()
    seconds = time.perf_counter() - start
    fresh = make(5, dtype)
    t2, _ = trainer(fresh, f"{tmp}/{case}-b", **kwargs)
    t2.train(resume_from_checkpoint=f"{tmp}/{case}-a/checkpoint-15")
    resume_diff = max((a.double() - b.double()).abs().max().item()
                      for a, b in zip(model.state_dict().values(),
                                      fresh.state_dict().values(), strict=True))
    save_pretrained_merged(model, f"{tmp}/{case}-dense")
    dense = AutoModelForCausalLM.from_pretrained(f"{tmp}/{case}-dense", dtype=dtype)
    dense = dense.to(DEVICE).eval()
    model.eval()
    ids = Tokens(2).ids.to(DEVICE)
    # Trainer(bf16=True) leaves accelerate's autocast wrapper on model.forward: compare without.
    forward = model.__dict__.get("_original_forward", model.forward)
    with torch.no_grad():
        logit_diff = (dense(input_ids=ids).logits.float()
                      - forward(input_ids=ids).logits.float()).abs().max().item()
    return {"case": case, "fused": bool(opt.defaults.get("fused")), "merges": opt.merges,
            "train_loss": result.training_loss, "train_s": seconds,
            "resume_max_abs_diff": resume_diff, "dense_logit_max_abs_diff": logit_diff}


def accelerate_row() -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # Trainer set it up before
    accelerator = Accelerator(mixed_precision="bf16", cpu=DEVICE == "cpu")
    model = make(0, torch.float32)
    opt = POETAdamW(model, lr=3e-3, poet_lr=1e-3)
    loader = torch.utils.data.DataLoader(Tokens(96), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"case": "accelerate-bf16", "fused": bool(opt.optimizer.defaults.get("fused")),
            "merges": opt.optimizer.merges, "loss_first": losses[0], "loss_last": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/integrations.json")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    rows = [trainer_row("fp32-trainer-bf16-autocast", torch.float32, tmp, bf16=True),
            trainer_row("bf16-model", torch.bfloat16, tmp), accelerate_row()]
    print_table(rows, ["case", "fused", "merges", "train_loss", "train_s", "resume_max_abs_diff",
                       "dense_logit_max_abs_diff", "loss_first", "loss_last"])
    write_json(args.out, rows, environment())


if __name__ == "__main__":
    main()
