"""Decoder blocks compiled around their POET layers (``poetx.model.compile_blocks``), on CPU
through dynamo with the ``aot_eager`` backend (the tracing, graph breaks and autograd of the
real thing, without inductor's code generation): the same losses and gradients as the eager
model, the POET layers still on their batched rotation build, one compiled code for all
identical blocks. The inductor path on CUDA is tested in ``test_trainer.py`` (GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import poetx
from poetx import POETConfig, POETLinear
from poetx.model.compile_blocks import compile_blocks, compiled_blocks, uncompile_blocks
from poetx.model.wrap import poet_layers

VOCAB = 512


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(layers: int = 2):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = poetx.wrap(LlamaForCausalLM(config), POETConfig(block_size=32,
                                                            batch_rotations="on"))
    with torch.no_grad():
        for _, layer in poet_layers(model):
            layer.theta_in.normal_(0, 0.02)
            layer.theta_out.normal_(0, 0.02)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_compiled_blocks_compute_the_eager_model(monkeypatch):
    import poetx.layers.poet_linear as layer_module

    eager = _model()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == 2
    assert compile_blocks(compiled, backend="aot_eager") == 2  # idempotent
    assert compiled_blocks(compiled) == 2 and compiled_blocks(eager) == 0
    prebuilt = []
    real = layer_module.poet_linear_prebuilt
    monkeypatch.setattr(layer_module, "poet_linear_prebuilt",
                        lambda *a, **k: prebuilt.append(1) or real(*a, **k))
    ids = torch.randint(0, VOCAB, (2, 17))
    for _ in range(2):
        ref_loss, ref_grads = _loss_and_grads(eager, ids)
        prebuilt.clear()
        loss, grads = _loss_and_grads(compiled, ids)
        # every POET layer of the compiled blocks ran eagerly on its block's batched build
        assert len(prebuilt) == 2 * 7
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert grads.keys() == ref_grads.keys()
        assert any(n.endswith("theta_in") for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sum(counters["graph_break"].values()) > 0  # the POET layers stay out of the graphs
    uncompile_blocks(compiled)
    assert compiled_blocks(compiled) == 0
    assert not any("forward" in m.__dict__ for m in compiled.modules()
                   if isinstance(m, POETLinear))


def test_identical_blocks_share_one_compiled_code():
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        model = _model(layers)
        compile_blocks(model, backend="aot_eager")
        ids = torch.randint(0, VOCAB, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] > 0 and graphs[4] == graphs[2]


def test_a_deep_copy_of_a_compiled_model_computes_with_its_own_parameters():
    model = _model()
    compile_blocks(model, backend="aot_eager")
    twin = copy.deepcopy(model)
    assert compiled_blocks(twin) == 2
    with torch.no_grad():
        for _, layer in poet_layers(twin):
            layer.theta_out.mul_(-1.0)
        twin.model.layers[0].input_layernorm.weight.mul_(0.5)
    reference = copy.deepcopy(twin)
    uncompile_blocks(reference)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out, twin_out, ref_out = (m(input_ids=ids).logits for m in (model, twin, reference))
    torch.testing.assert_close(twin_out, ref_out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, twin_out, rtol=1e-3, atol=1e-4)


def test_compiled_blocks_fan_out_shared_inputs(monkeypatch):
    """With ``shared_inputs="on"`` the compiled blocks' POET layers (graph breaks) still get
    one tensor object for q/k/v and for gate/up: after the learning forward they fan out,
    with the eager model's losses and gradients."""
    from dataclasses import replace

    import poetx.layers.shared_inputs as shared_module

    eager = _model()
    compiled = copy.deepcopy(eager)
    for _, layer in poet_layers(compiled):
        layer.config = replace(layer.config, shared_inputs="on")
    compile_blocks(compiled, backend="aot_eager")
    sizes = []
    real = shared_module.fan_out
    monkeypatch.setattr(shared_module, "fan_out",
                        lambda x, i, p: sizes.append(len(i)) or real(x, i, p))
    ids = torch.randint(0, VOCAB, (2, 17))
    for step in range(2):
        ref_loss, ref_grads = _loss_and_grads(eager, ids)
        sizes.clear()
        loss, grads = _loss_and_grads(compiled, ids)
        assert sorted(sizes) == ([] if step == 0 else [2, 2, 3, 3])
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_leaves_the_blocks_uncompiled():
    """``torch.utils.checkpoint.checkpoint`` runs under ``torch._disable_dynamo``, so a block
    that HF checkpoints never reaches its compiled forward's tracing: no graph is made, in
    forward or in the recompute. The Trainer therefore does not compile under
    ``grad_checkpointing`` and the planner counts those blocks as eager
    (``Setting.blocks_compiled``)."""
    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert compile_blocks(model, backend="aot_eager") == 2
    ids = torch.randint(0, VOCAB, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 0
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] > 0  # the same blocks compile once unchecked
