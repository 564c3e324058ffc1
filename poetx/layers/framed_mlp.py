"""SwiGLU MLPs whose three POET layers hand their activations over in their own permuted
orders (``POETConfig.mlp_frames="fused"``).

In ``down(silu(gate(x)) * up(x))`` every POET layer computes in its permuted order: gate and
up would scatter their outputs back to natural columns, and down would gather its input
again. Here gate and up return their outputs as they computed them (``y[..., perm_out]``),
down takes its input in its own order (``h[..., perm_in]``), and one kernel
(``poetx.ops.frame_swiglu``) reads the two outputs through composed index maps and writes
``h`` in down's order. In backward the same kernel family writes each gradient in its
layer's order. Every layer keeps its own permutations, so the values are those of the
unfused path.

The maps live on the MLP module as non-persistent int32 buffers, rewritten in place whenever
the permutations change: after merges (``poetx.model.wrap.merge_all_`` and the FSDP merge),
after a state dict is loaded, and at wrap time. In-place writes keep captured CUDA graphs
valid.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from poetx.kernels.frame_swiglu_ref import FrameMaps, frame_maps
from poetx.layers.poet_linear import POETLinear
from poetx.ops.frame_swiglu import swiglu_frames

MLP_TRIPLE = ("gate_proj", "up_proj", "down_proj")
# Left out of compiled decoder blocks, like the POET layers around it (``compile_blocks``):
# its Triton kernels run as they are, and nothing next to it would fuse with it.
_eager_swiglu_frames = torch.compiler.disable(swiglu_frames)
_MAP_BUFFERS = tuple(f"frame_map_{name}" for name in FrameMaps._fields)
_HOOKED = "_poetx_frame_maps_hooked"


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _fusable(module: nn.Module) -> bool:
    """A SwiGLU MLP (``act_fn`` SiLU) of three POET layers with one intermediate width,
    without biases and without shared permutations."""
    layers = [getattr(module, name, None) for name in MLP_TRIPLE]
    if not all(isinstance(layer, POETLinear) for layer in layers):
        return False
    gate, up, down = layers
    width = gate.out_features
    return (_is_silu(getattr(module, "act_fn", None))
            and up.out_features == width and down.in_features == width
            and all(layer.bias is None for layer in layers)
            and not (gate.frame_out or up.frame_out or down.frame_in))


def fused_mlps(model: nn.Module) -> Iterator[nn.Module]:
    """The MLPs of ``model`` that :func:`fuse_mlp_frames` fused."""
    for module in model.modules():
        if hasattr(module, _MAP_BUFFERS[0]):
            yield module


def _framed_forward(self: nn.Module, x: Tensor) -> Tensor:
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    width = gate.shape[-1]
    maps = FrameMaps(*(getattr(self, name) for name in _MAP_BUFFERS))
    h = _eager_swiglu_frames(gate.reshape(-1, width), up.reshape(-1, width), maps)
    return self.down_proj(h.reshape(gate.shape))


@torch.no_grad()
def _write_maps(mlp: nn.Module) -> None:
    maps = frame_maps(mlp.gate_proj.perm_out, mlp.up_proj.perm_out, mlp.down_proj.perm_in,
                      mlp.gate_proj.out_features)
    for name, value in zip(_MAP_BUFFERS, maps, strict=True):
        getattr(mlp, name).copy_(value)


def refresh_mlp_frames(model: nn.Module) -> None:
    """Rewrite the maps of every fused MLP from its layers' current permutations (in place)."""
    for mlp in fused_mlps(model):
        _write_maps(mlp)


def _after_load(mlp: nn.Module, _incompatible_keys) -> None:
    if hasattr(mlp, _MAP_BUFFERS[0]):  # the hook stays after unfuse_mlp_frames: then a no-op
        _write_maps(mlp)


def fuse_mlp_frames(model: nn.Module) -> int:
    """Fuse every eligible MLP of ``model`` (see the module notes); returns how many."""
    count = 0
    for module in list(model.modules()):
        if hasattr(module, _MAP_BUFFERS[0]) or not _fusable(module):
            continue
        gate, up, down = (getattr(module, name) for name in MLP_TRIPLE)
        for name in _MAP_BUFFERS:
            module.register_buffer(name, torch.empty(gate.out_features, dtype=torch.int32,
                                                     device=gate.perm_out.device),
                                   persistent=False)
        _write_maps(module)
        gate.output_in_frame = up.output_in_frame = True
        down.input_in_frame = True
        module.forward = types.MethodType(_framed_forward, module)
        if not getattr(module, _HOOKED, False):
            module.register_load_state_dict_post_hook(_after_load)
            setattr(module, _HOOKED, True)
        count += 1
    return count


def unfuse_mlp_frames(model: nn.Module) -> None:
    """Undo :func:`fuse_mlp_frames`: the MLPs run their own forward again."""
    for mlp in list(fused_mlps(model)):
        for name in _MAP_BUFFERS:
            delattr(mlp, name)
        mlp.gate_proj.output_in_frame = mlp.up_proj.output_in_frame = False
        mlp.down_proj.input_in_frame = False
        del mlp.forward
