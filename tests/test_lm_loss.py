from __future__ import annotations

import pytest
import torch
from torch import nn

from poetx.model.lm_loss import causal_lm_loss, chunked_cross_entropy
from poetx.model.loss_chunks import auto_chunk_tokens, vocab_chunk


@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 20], ids=["recomputed", "kept"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_cross_entropy_matches_full_logits(chunk, keep_logits_bytes):
    hidden = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (29,))
    targets[3] = -100
    loss = chunked_cross_entropy(hidden, weight, targets, chunk, keep_logits_bytes)
    ref = nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    assert loss.dtype == torch.float64  # float64 inputs accumulate in float64
    torch.testing.assert_close(loss, ref)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.backward()
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)


def test_kept_logits_follow_the_byte_limit_and_the_need_for_a_gradient():
    """The whole logits are kept (the one tensor of ``tokens x vocab`` saved) only where they
    fit the limit and backward will run; a second backward of the same graph is refused, as
    the first wrote the gradient over them."""
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (12,))

    def saved_shapes(limit, grad=True):
        shapes = []
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(
                lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            loss = chunked_cross_entropy(hidden, weight, targets, 5, limit)
        return loss, shapes

    loss, shapes = saved_shapes(12 * 40 * 4)
    assert (12, 40) in shapes
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    assert (12, 40) not in saved_shapes(12 * 40 * 4 - 1)[1]
    assert saved_shapes(1 << 20, grad=False)[1] == []


def test_chunked_cross_entropy_names_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3).long())
    with pytest.raises(ValueError, match=r"\(N, H\) and \(V, H\)"):
        chunked_cross_entropy(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4).long())


@pytest.mark.parametrize(("vocab", "tokens"), [(128256, 1024), (128256, 4096), (32000, 8192),
                                               (32000, 16384), (50257, 4096)])
def test_loss_chunks_are_whole_gemm_tiles(vocab, tokens):
    # A vocabulary chunk of 8172 rows (Llama-8B, 4096 tokens) made cuBLAS fall back to
    # 2-byte-aligned kernels for the head's backward GEMMs.
    chunk = auto_chunk_tokens(vocab)
    rows = vocab_chunk(chunk, vocab, tokens)
    assert chunk % 128 == 0 and chunk * vocab <= 1 << 25
    assert rows % 128 == 0 and rows <= chunk * vocab // tokens
    assert (rows + 128) > chunk * vocab // tokens  # rounded down by less than one tile


def test_rounded_vocabulary_chunks_keep_the_loss_exact():
    # 300 rows in chunks of 128 (150 rounded down): two whole chunks and a ragged one.
    assert vocab_chunk(20, 300, 40) == 128
    hidden = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    loss = chunked_cross_entropy(hidden, weight, targets, 20, keep_logits_bytes=0)
    ref = nn.functional.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(loss.double(), ref)  # the sum is kept in float32
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_causal_lm_loss_matches_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg)
    batch = torch.randint(0, 97, (2, 11))
    chunked = causal_lm_loss(model, batch, chunk_tokens=5)
    full = causal_lm_loss(model, batch, chunk_tokens=None)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_lm_loss(model, batch), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [5, None])
def test_loss_attends_causally_without_a_mask_where_hf_would_build_one(monkeypatch, chunk_tokens):
    """transformers 5.17 builds an explicit causal mask while a CUDA graph is captured (it
    counts that as tracing); ``lm_loss`` runs the model with no mask in every mode. Simulated
    here by making HF refuse its mask-free path: the loss then sees no mask, equals the masked
    loss (same causality, another kernel), and the config is ``sdpa`` again afterwards."""
    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    from poetx.model.causal_attention import unmasked_causal_attention

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    batch = torch.randint(0, 97, (2, 11))
    masks = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    with torch.no_grad():
        masked = model(input_ids=batch[:, :-1]).logits
    assert masks and all(m is not None for m in masks)  # what HF does when it thinks it traces
    masks.clear()
    loss = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
    assert len(masks) == 2 and all(m is None for m in masks)
    ref = nn.functional.cross_entropy(masked.flatten(0, 1).float(), batch[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    with unmasked_causal_attention(nn.Linear(2, 2)):  # not an HF model: left alone
        pass


def test_sliding_window_models_keep_their_masks():
    from transformers import MistralConfig, Qwen2Config

    from poetx.model.causal_attention import CAUSAL_SDPA, unmasked_causal_attention

    class Holder(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    cases = [(MistralConfig(sliding_window=8), "sdpa"),
             (Qwen2Config(use_sliding_window=False), CAUSAL_SDPA),
             (Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0),
              "sdpa")]
    for config, inside in cases:
        config._attn_implementation = "sdpa"
        with unmasked_causal_attention(Holder(config)):
            assert config._attn_implementation == inside, config
        assert config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recomputed", "kept"])
def test_chunked_cross_entropy_bf16_on_cuda_matches_float32(keep_logits_bytes):
    """The CUDA path (the Triton kernels over bf16 logits, 16-bit GEMMs with float32
    accumulation) against float32 full logits: bf16-input error, no more."""
    hidden = torch.randn(300, 64, device="cuda")
    weight = torch.randn(1000, 64, device="cuda") * 0.1
    targets = torch.randint(0, 1000, (300,), device="cuda")
    targets[7] = -100
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = chunked_cross_entropy(h, w, targets, 64, keep_logits_bytes)
    loss.backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = nn.functional.cross_entropy(hr @ wr.T, targets, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for got, want in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert float((got.float() - want).norm() / want.norm()) < 1e-2
