"""A tiny Llama trained through the library API on real text lowers its loss clearly."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from poetx.data import build_data
from poetx.model.lm_loss import causal_lm_loss


def test_tiny_llama_learns_shakespeare():
    torch.manual_seed(0)
    data = build_data(None, seq_len=64, batch_size=8, seed=0, vocab_size=512, max_val_batches=4)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=data.vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    config = poetx.POETConfig(block_size=64, merge_every=40)
    poetx.wrap(model, config)
    optimizer = poetx.make_optimizer(model, lr=3e-3, poet_lr=3e-3)
    schedule = poetx.MergeSchedule(model, optimizer, config, clip_warmup_steps=5)

    def val_loss() -> float:
        with torch.no_grad():
            return sum(float(causal_lm_loss(model, b)) for b in data.val) / len(data.val)

    start = val_loss()
    for step in range(100):
        loss = causal_lm_loss(model, data.train.batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_value(1.0))
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    end = val_loss()
    assert schedule.merges - schedule.early_merges == 2  # the ||Q|| guard may add early ones
    assert end < start - 1.0, (start, end)
