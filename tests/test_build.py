from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from poetx.model.build import build_poet_model, rebuild_hf_rotary


def _config():
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def test_meta_build_matches_wrap_of_dense_model():
    cfg = poetx.POETConfig(block_size=32, seed=5)
    built = build_poet_model(lambda: LlamaForCausalLM(_config()), cfg, "cpu", torch.float32,
                             rebuild_buffers=rebuild_hf_rotary)
    assert not any(p.is_meta for p in built.parameters())
    assert not any(b.is_meta for b in built.buffers())
    assert built.lm_head.weight is built.model.embed_tokens.weight
    wrapped = poetx.wrap(LlamaForCausalLM(_config()), cfg)
    for (name, a), (_, b) in zip(poetx.model.wrap.poet_layers(built),
                                 poetx.model.wrap.poet_layers(wrapped), strict=True):
        assert torch.equal(a.w0, b.w0) and torch.equal(a.perm_in, b.perm_in), name
    torch.testing.assert_close(built.model.rotary_emb.inv_freq, wrapped.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 101, (2, 9))
    loss = built(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
