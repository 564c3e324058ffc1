"""AdamW with separate parameter groups for rotation and ordinary parameters."""

from __future__ import annotations

import torch
from torch import nn

from poetx.model.wrap import rotation_parameters

POET_GROUP = "poet"
DECAY_GROUP = "decay"
NO_DECAY_GROUP = "no_decay"
# Adam eps of the rotation group (see make_optimizer).
POET_EPS = 1e-6


def make_optimizer(
    model: nn.Module,
    lr: float,
    poet_lr: float,
    weight_decay: float = 0.0,
    poet_weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    poet_eps: float = POET_EPS,
    dense_optimizer: str = "adamw",
    capturable: bool = False,
    rotation_8bit: bool = False,
) -> torch.optim.AdamW:
    """A standard ``torch.optim.AdamW`` over the trainable parameters of ``model``.

    Groups (each carries ``"name"``): ``"poet"`` — the skew parameters of every ``POETLinear``,
    at ``poet_lr`` with ``poet_weight_decay`` (decay would pull rotations to the identity);
    ``"decay"`` — other trainable matrices (embeddings, lm_head, dense layers) at ``lr`` with
    ``weight_decay``; ``"no_decay"`` — vectors (norms, biases) at ``lr`` without decay. Frozen
    ``W0`` has ``requires_grad=False`` and gets no state. ``fused`` defaults to True when every
    parameter is on CUDA, else the foreach implementation is used. ``dense_optimizer``:
    ``"adamw"``, or ``"adamw-kahan"`` / ``"adamw-fp32-master"`` so that bf16 embeddings, lm_head
    and norms keep their small updates, or ``"adamw8bit"`` (torchao 8-bit states for embedding
    and lm_head; ``rotation_8bit`` gives the rotations 8-bit states too)
    (``poetx.optim.dense_update``).

    Rotation convention: the ``"poet"`` group runs at ``poet_lr`` with its own Adam ``poet_eps``
    (default ``1e-6``, as the authors). The skew gradients are small (``1e-6`` .. ``1e-4``), so
    with ``eps = 1e-8`` Adam moves nearly every entry by ``lr`` per step whatever its gradient;
    ``1e-6`` damps the entries whose gradient is at noise level. The presets' ``poet_lr``
    values (``poetx.train.config``) are chosen with it so that the largest block ``||Q||``
    stays small within a merge period (see README, "Rotation size").
    ``capturable`` (``dense_optimizer="adamw"`` only): every group's ``lr`` is a 0-d float32
    tensor on the parameters' device (change it in place, e.g. ``group["lr"].fill_(x)``, as
    torch's LR schedulers do) and the step is the fused kernel with ``capturable=True``, so it
    can be recorded in a CUDA graph; see :mod:`poetx.train.capture`.
    """
    for name, value in (("lr", lr), ("poet_lr", poet_lr), ("poet_eps", poet_eps)):
        if not value > 0:
            raise ValueError(f"{name}: must be positive, got {value}")
    if weight_decay < 0 or poet_weight_decay < 0:
        raise ValueError("weight_decay and poet_weight_decay must be non-negative")
    rotation = rotation_parameters(model)
    rotation_ids = {id(p) for p in rotation}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in rotation_ids:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": rotation, "lr": poet_lr, "weight_decay": poet_weight_decay, "eps": poet_eps,
         "name": POET_GROUP},
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": DECAY_GROUP},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": NO_DECAY_GROUP},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("make_optimizer: the model has no trainable parameter")
    all_params = [p for g in groups for p in g["params"]]
    if capturable:
        if dense_optimizer != "adamw":
            raise ValueError(f"capturable: only with dense_optimizer='adamw' (the one whose "
                             f"step was checked under CUDA-graph capture), got {dense_optimizer!r}")
        device = all_params[0].device
        for g in groups:
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True,
                                 capturable=True)
    if fused is None:
        fused = all(p.is_cuda for p in all_params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    if dense_optimizer != "adamw" or rotation_8bit:
        from poetx.optim.dense_update import make_dense_variant

        return make_dense_variant(dense_optimizer, groups, rotation_8bit=rotation_8bit, lr=lr,
                                  betas=betas, eps=eps, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
