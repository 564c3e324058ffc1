"""``torch.compile`` of the code between the POET layers of each decoder block.

Once a training step is replayed as one CUDA graph (``poetx.train.capture``) the host no longer
sets the pace, and what an eager Hugging Face block still costs is GPU time in many small
kernels: RMSNorm in float32 piece by piece, the rotary halves, SiLU times up, the residual
adds. Compiling each block's ``forward`` lets inductor fuse them, while every ``POETLinear``
stays out of the traced code (its ``forward`` is ``torch.compiler.disable``d, a graph break):
the layer keeps its batched rotation build and its custom op exactly as in eager mode, so the
compiled block computes the same function with fewer kernels. Identical blocks share one
compiled code (dynamo lifts parameters to inputs), so a 32-block model compiles each piece
once.

Graph breaks cost host time per call; that is paid once, at CUDA-graph capture, when the step
is replayed, and on every call when it is not, so the Trainer compiles only captured steps.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from poetx.layers.poet_linear import POETLinear
from poetx.layers.rotation_groups import poet_blocks

__all__ = ["compile_blocks", "compiled_blocks", "uncompile_blocks"]

# Set on a block whose forward this module replaced, so a second call adds nothing and
# uncompile_blocks finds it.
_MARK = "_poetx_compiled_forward"


def compile_blocks(model: nn.Module, backend: str = "inductor", **options) -> int:
    """Compile the ``forward`` of every decoder block of ``model`` that holds POET layers
    (``poetx.layers.rotation_groups.poet_blocks``), leaving the POET layers eager. Returns
    how many blocks are compiled. ``options`` go to ``torch.compile`` (e.g. ``mode``).

    The replaced forwards are the class functions, compiled or disabled, bound to each module
    (``types.MethodType``), so a ``copy.deepcopy`` of the model binds them to the copies."""
    eager_poet = torch.compiler.disable(POETLinear.forward)
    compiled: dict[type, object] = {}
    blocks = poet_blocks(model)
    for block in blocks:
        if _MARK in block.__dict__:
            continue
        for module in block.modules():
            if isinstance(module, POETLinear) and "forward" not in module.__dict__:
                module.forward = types.MethodType(eager_poet, module)
        kind = type(block)
        if kind not in compiled:
            compiled[kind] = torch.compile(kind.forward, backend=backend, **options)
        block.forward = types.MethodType(compiled[kind], block)
        block.__dict__[_MARK] = True
    return len(blocks)


def compiled_blocks(model: nn.Module) -> int:
    """How many blocks of ``model`` :func:`compile_blocks` compiled."""
    return sum(1 for m in model.modules() if _MARK in m.__dict__)


def uncompile_blocks(model: nn.Module) -> None:
    """Undo :func:`compile_blocks`: blocks and POET layers run their class's ``forward``."""
    for block in model.modules():
        if block.__dict__.pop(_MARK, None) is None:
            continue
        block.__dict__.pop("forward", None)
        for module in block.modules():
            if isinstance(module, POETLinear):
                module.__dict__.pop("forward", None)
