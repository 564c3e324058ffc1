"""An MLP's gate/up outputs and down input sharing one permutation
(``POETConfig.mlp_permutations="shared"``): the activations between them stay permuted, and
the model computes what the same permutations applied the usual way compute."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import LlamaForCausalLM

import poetx
from poetx import POETConfig
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.wrap import check_shared_frames, merge_all_, poet_layers
from tests.tiny_llama import (
    LAYER_SETTINGS,
    VOCAB,
    assert_twin_matches,
    hf_config,
    loss_and_grads,
    settings_id,
    wrapped_llama,
)


def _model(intermediate: int = 160, **settings) -> torch.nn.Module:
    config = POETConfig(block_size=32, mlp_permutations="shared", **settings)
    return wrapped_llama(config, intermediate)


def _unshared_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same layers, permutations and weights, each side gathering and scattering its own
    activations (no shared frame)."""
    twin = copy.deepcopy(model)
    for _, layer in poet_layers(twin):
        layer.frame_in = layer.frame_out = ""
    return twin


def _frames(model) -> dict[str, tuple[str, str]]:
    return {name: (layer.frame_in, layer.frame_out) for name, layer in poet_layers(model)
            if layer.frame_in or layer.frame_out}


def test_the_three_layers_of_each_mlp_share_one_permutation():
    model = _model()
    frames = _frames(model)
    assert frames == {f"model.layers.{i}.mlp.{c}": f
                      for i in range(2)
                      for c, f in (("gate_proj", ("", f"model.layers.{i}.mlp.intermediate")),
                                   ("up_proj", ("", f"model.layers.{i}.mlp.intermediate")),
                                   ("down_proj", (f"model.layers.{i}.mlp.intermediate", "")))}
    mlps = [block.mlp for block in model.model.layers]
    for mlp in mlps:
        assert torch.equal(mlp.gate_proj.perm_out, mlp.up_proj.perm_out)
        assert torch.equal(mlp.gate_proj.perm_out, mlp.down_proj.perm_in)
        assert not torch.equal(mlp.gate_proj.perm_in, mlp.up_proj.perm_in)  # own input sides
    assert not torch.equal(mlps[0].gate_proj.perm_out, mlps[1].gate_proj.perm_out)
    # the default draws every layer's own
    independent = poetx.wrap(LlamaForCausalLM(hf_config()), POETConfig(block_size=32))
    assert _frames(independent) == {}


@pytest.mark.parametrize("intermediate", [160, 150])  # 150: a padded last block of 32
@pytest.mark.parametrize("settings", LAYER_SETTINGS, ids=settings_id)
def test_shared_frames_compute_what_the_same_permutations_compute_the_usual_way(settings,
                                                                               intermediate):
    """Logits, loss and every gradient equal those of the same model gathering and scattering
    on every side (float64), over the forward that learns the fan-outs and the next; the
    logits also equal those of the dense model ``unwrap`` gives."""
    model = _model(intermediate, **settings)
    assert len(_frames(model)) == 6
    twin = _unshared_twin(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = assert_twin_matches(model, twin, ids, steps=2)
    dense = poetx.unwrap(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, logits, rtol=1e-9, atol=1e-9)


def test_merges_draw_new_shared_permutations_and_merge_what_the_usual_way_merges():
    """After ``merge_all_`` the three share a new permutation, and the model computes what
    the same model without shared frames computes after its merge (whose new permutations
    differ: the merged dense weights do not depend on them)."""
    model = _model()
    twin = _unshared_twin(model)
    before = [mlp.gate_proj.perm_out.clone() for mlp in (b.mlp for b in model.model.layers)]
    assert merge_all_(model) == 14 and merge_all_(twin) == 14
    for old, mlp in zip(before, (b.mlp for b in model.model.layers), strict=True):
        assert not torch.equal(old, mlp.gate_proj.perm_out)
        assert torch.equal(mlp.gate_proj.perm_out, mlp.up_proj.perm_out)
        assert torch.equal(mlp.gate_proj.perm_out, mlp.down_proj.perm_in)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, twin(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
        dense = poetx.unwrap(copy.deepcopy(model))(input_ids=ids).logits
    torch.testing.assert_close(logits, dense, rtol=1e-9, atol=1e-9)


def test_a_layer_merged_apart_from_its_partners_is_named():
    model = _model()
    model.model.layers[1].mlp.up_proj.merge_()
    with pytest.raises(RuntimeError, match="layers.1.mlp.*share the permutation"):
        check_shared_frames(model)


def test_mlps_that_cannot_share_keep_their_own_permutations():
    excluded = _model(exclude=("*.1.mlp.down_proj",))
    assert set(_frames(excluded)) == {f"model.layers.0.mlp.{c}"
                                      for c in ("gate_proj", "up_proj", "down_proj")}


def test_built_models_share_them_too():
    config = POETConfig(block_size=32, mlp_permutations="shared")
    model = build_poet_model(lambda: LlamaForCausalLM(hf_config()), config, "cpu",
                             torch.float32, rebuild_buffers=rebuild_hf_rotary)
    assert len(_frames(model)) == 6
    mlp = model.model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.perm_out, mlp.down_proj.perm_in)
    assert replace(config, mlp_permutations="independent").mlp_permutations == "independent"


def test_the_intermediate_activations_travel_permuted():
    """What gate_proj and up_proj return is their usual output in the shared permuted order
    (so no scatter ran), and down_proj reads its input so."""
    model = _model()
    twin = _unshared_twin(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(key):
        def hook(module, args, output):
            seen[key] = (args[0].detach(), output.detach())
        return hook

    for tag, m in (("shared", model), ("own", twin)):
        mlp = m.model.layers[0].mlp
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).register_forward_hook(keep(f"{tag}.{name}"))
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
        twin(input_ids=ids)
    perm = model.model.layers[0].mlp.gate_proj.perm_out
    assert not torch.equal(perm, torch.arange(perm.numel()))
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(seen[f"shared.{name}"][1], seen[f"own.{name}"][1][..., perm],
                                   rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(seen["shared.down_proj"][0], seen["own.down_proj"][0][..., perm],
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(seen["shared.down_proj"][1], seen["own.down_proj"][1],
                               rtol=1e-12, atol=1e-13)


def test_shared_frames_under_activation_checkpointing():
    model = _model(mode="mem", batch_rotations="on")
    twin = _unshared_twin(model)
    for m in (model, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    _, loss, grads = loss_and_grads(model, ids)
    _, ref_loss, ref_grads = loss_and_grads(twin, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-11, atol=1e-13, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("intermediate", [160, 150])  # 150: padded, and no TMA (600-byte rows)
def test_shared_frames_on_cuda_match_the_usual_way(intermediate):
    """The Triton path (batched builds, fan-outs) in float32: the shared-frame model against
    its twin gathering and scattering on every side. The values are the same up to the order
    of the Gram kernels' split-token sums."""
    config = POETConfig(block_size=32, mlp_permutations="shared")
    model = wrapped_llama(config, intermediate, theta_std=0.02, dtype=torch.float32,
                          device="cuda")
    ids = torch.randint(0, VOCAB, (4, 64), device="cuda")
    assert_twin_matches(model, _unshared_twin(model), ids, steps=2)
