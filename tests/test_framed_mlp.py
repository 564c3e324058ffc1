"""MLPs whose three POET layers hand their activations over in their own permuted orders
(``POETConfig.mlp_frames="fused"``, ``poetx.layers.framed_mlp``): the model computes what the
same model gathering and scattering on every side computes, through merges, a loaded state
dict, activation checkpointing and compiled blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

import poetx
from poetx import POETConfig
from poetx.kernels.frame_swiglu_ref import frame_maps
from poetx.layers.framed_mlp import fused_mlps, unfuse_mlp_frames
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.wrap import merge_all_, poet_layers
from tests.tiny_llama import (
    LAYER_SETTINGS,
    VOCAB,
    assert_twin_matches,
    hf_config,
    settings_id,
    wrapped_llama,
)


def _model(intermediate: int = 160, seed: int = 0, **settings) -> torch.nn.Module:
    config = POETConfig(block_size=32, mlp_frames="fused", seed=seed, **settings)
    return wrapped_llama(config, intermediate)


def _unfused_twin(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    unfuse_mlp_frames(twin)
    return twin


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("intermediate", [160, 150])  # 150: a padded last block of 32
@pytest.mark.parametrize("settings", LAYER_SETTINGS, ids=settings_id)
def test_fused_mlps_compute_what_the_unfused_model_computes(settings, intermediate):
    """Logits, loss and every gradient equal those of the same layers and permutations
    gathering and scattering on every side (float64), over two steps; the dense model that
    ``unwrap`` gives computes the same logits."""
    model = _model(intermediate, **settings)
    assert len(list(fused_mlps(model))) == 2
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.output_in_frame and mlp.up_proj.output_in_frame
    assert mlp.down_proj.input_in_frame and not mlp.down_proj.saves_permuted_input
    assert not torch.equal(mlp.gate_proj.perm_out, mlp.up_proj.perm_out)  # own permutations
    twin = _unfused_twin(model)
    assert not list(fused_mlps(twin)) and "forward" not in twin.model.layers[0].mlp.__dict__
    for _ in range(2):
        logits = assert_twin_matches(model, twin, _ids(1))
    dense = poetx.unwrap(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=_ids(1)).logits, logits, rtol=1e-9,
                                   atol=1e-9)


def test_the_activations_between_the_layers_travel_in_each_layers_order():
    model = _model()
    twin = _unfused_twin(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(key):
        def hook(module, args, output):
            seen[key] = (args[0].detach(), output.detach())
        return hook

    for tag, m in (("fused", model), ("own", twin)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(m.model.layers[0].mlp, name).register_forward_hook(keep(f"{tag}.{name}"))
    with torch.no_grad():
        model(input_ids=_ids(3))
        twin(input_ids=_ids(3))
    mlp = model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj"):
        perm = getattr(mlp, name).perm_out
        torch.testing.assert_close(seen[f"fused.{name}"][1], seen[f"own.{name}"][1][..., perm],
                                   rtol=1e-12, atol=1e-13)
    perm = mlp.down_proj.perm_in
    torch.testing.assert_close(seen["fused.down_proj"][0], seen["own.down_proj"][0][..., perm],
                               rtol=1e-12, atol=1e-13)


def _maps_match(model) -> bool:
    for mlp in fused_mlps(model):
        want = frame_maps(mlp.gate_proj.perm_out, mlp.up_proj.perm_out, mlp.down_proj.perm_in,
                          mlp.gate_proj.out_features)
        got = [getattr(mlp, f"frame_map_{name}") for name in want._fields]
        if not all(torch.equal(g.long(), w) for g, w in zip(got, want, strict=True)):
            return False
    return True


def test_merges_rewrite_the_maps_in_place():
    model = _model()
    twin = _unfused_twin(model)
    mlp = model.model.layers[1].mlp
    storage = mlp.frame_map_gate_from_h.data_ptr()
    before = mlp.frame_map_gate_from_h.clone()
    assert merge_all_(model) == 14 and merge_all_(twin) == 14
    assert mlp.frame_map_gate_from_h.data_ptr() == storage  # captured graphs stay valid
    assert not torch.equal(before, mlp.frame_map_gate_from_h) and _maps_match(model)
    with torch.no_grad():
        for m in (model, twin):
            for _, layer in poet_layers(m):
                layer.theta_out.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    assert_twin_matches(model, twin, _ids(2))


def test_a_loaded_state_dict_brings_its_permutations_and_the_maps_follow():
    source = _model(seed=0)
    merge_all_(source)
    target = _model(seed=1)  # other permutations
    assert not _maps_match_between(source, target)
    target.load_state_dict(source.state_dict())
    assert _maps_match(target) and _maps_match_between(source, target)
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=_ids(4)).logits,
                                   source(input_ids=_ids(4)).logits, rtol=1e-12, atol=1e-12)
    assert not any("frame_map" in key for key in source.state_dict())  # not in checkpoints


def _maps_match_between(a, b) -> bool:
    return all(torch.equal(x.frame_map_gate_from_h, y.frame_map_gate_from_h)
               for x, y in zip(fused_mlps(a), fused_mlps(b), strict=True))


def test_fused_mlps_under_activation_checkpointing():
    model = _model(mode="mem", batch_rotations="on")
    twin = _unfused_twin(model)
    for m in (model, twin):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    assert_twin_matches(model, twin, _ids(6))


def test_fused_mlps_in_compiled_blocks():
    from poetx.model.compile_blocks import compile_blocks

    model = _model()
    twin = _unfused_twin(model)
    assert compile_blocks(model, backend="aot_eager") == 2
    assert_twin_matches(model, twin, _ids(7))


def test_what_is_not_a_silu_mlp_of_three_poet_layers_stays_unfused():
    shared = _model(mlp_permutations="shared")
    assert not list(fused_mlps(shared))  # shared permutations need no moving between orders
    excluded = _model(exclude=("*.1.mlp.down_proj",))
    assert len(list(fused_mlps(excluded))) == 1
    unfused = poetx.wrap(LlamaForCausalLM(hf_config()), POETConfig(block_size=32,
                                                                   mlp_frames="off"))
    assert not list(fused_mlps(unfused))


def test_wrap_fuses_the_mlp_frames_by_default():
    model = poetx.wrap(LlamaForCausalLM(hf_config()), POETConfig(block_size=32))
    assert len(list(fused_mlps(model))) == 2 and _maps_match(model)


def test_built_models_fuse_too():
    config = POETConfig(block_size=32, mlp_frames="fused")
    model = build_poet_model(lambda: LlamaForCausalLM(hf_config()), config, "cpu",
                             torch.float32, rebuild_buffers=rebuild_hf_rotary)
    assert len(list(fused_mlps(model))) == 2 and _maps_match(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("intermediate", [160, 150])  # 150: a padded last block
def test_fused_mlps_on_cuda_match_the_unfused_model(intermediate):
    """The Triton path (frame-SwiGLU kernels, batched builds, fan-outs) in float32 against the
    unfused twin. The values differ only by rounding: the order of the Gram kernels'
    split-token sums, and the kernels' exp-based sigmoid against torch's; tolerances as for
    the shared frames (``test_mlp_frames``)."""
    config = POETConfig(block_size=32, mlp_frames="fused")
    model = wrapped_llama(config, intermediate, theta_std=0.02, dtype=torch.float32,
                          device="cuda")
    assert len(list(fused_mlps(model))) == 2
    ids = torch.randint(0, VOCAB, (4, 64), device="cuda")
    assert_twin_matches(model, _unfused_twin(model), ids, steps=2)
