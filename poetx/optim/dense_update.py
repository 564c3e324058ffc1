"""AdamW whose bf16 parameters do not silently drop small updates (and may keep 8-bit states).

A bf16 number has 8 significant bits: once ``|lr * update| < |p| / 512`` (late in a cosine
schedule, for embeddings, lm_head and norms), ``p + update`` rounds back to ``p`` and plain bf16
AdamW stops moving the parameter. Remedies, chosen per optimizer (``make_optimizer``'s
``dense_optimizer``):

- ``"kahan"``: compensated summation. Each bf16 parameter keeps a bf16 buffer of the rounding
  error of its last update, added to the next one, so updates accumulate until they move the
  parameter (2 extra bytes per parameter).
- ``"fp32-master"``: a float32 master copy receives the updates; the bf16 parameter is its
  rounding (4 extra bytes per parameter).
- ``"adamw8bit"`` (:class:`LowBitAdamW`): torchao's 8-bit Adam states (about 2 bytes per
  parameter instead of 4) and stochastic rounding for the bf16 matrices (embedding, lm_head);
  bf16 vectors (norms, a few KB) keep bf16 states with Kahan compensation. Optionally the
  float32 rotation parameters get 8-bit states too (``rotation_8bit``).

Clipping and the non-finite skip (:class:`~poetx.optim.clip.DeviceGradClip` attaches
``grad_scale`` and ``found_inf`` to the optimizer): torch's fused kernel applies them to the
parameters it steps; the parameters stepped here are divided by ``grad_scale`` too, and skipped
when ``found_inf`` is set, which costs one read of ``found_inf`` by the host per step (these
optimizers are not capturable as a CUDA graph anyway).

Float32 parameters (the rotations) are stepped by ``torch.optim.AdamW`` itself (fused on CUDA),
exactly as without this option. The compensated update runs in slices of ``chunk_elements``
values, so its float32 scratch stays bounded (at most five float32 slices, ``20 *
chunk_elements`` bytes) even for a 128k x 4096 lm_head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

COMPENSATIONS = ("kahan", "fp32-master")
DEFAULT_CHUNK = 1 << 22
# torchao's quantization block of 8-bit states (values per float32 scale)
LOWBIT_BLOCK_SIZE = 256
# Values stepped at once by the 8-bit update: torchao's compiled step materializes float32
# copies of the states it quantizes (two full-size float32 buffers on CPU: 4 GiB for a Llama-8B
# lm_head), so large tensors are stepped in slices of whole quantization blocks.
LOWBIT_CHUNK = 1 << 24
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _SplitAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for the parameters it does not own; the owned ones (by default
    every bf16/fp16 parameter) are stepped by :meth:`_step_low_precision`. Groups (and their
    ``lr``) are shared, so schedules, the merge schedule and gradient clipping see one
    optimizer."""

    @staticmethod
    def _low_precision(p: Tensor) -> bool:
        return p.dtype in _LOW_PRECISION

    def _owns(self, group: dict, p: Tensor) -> bool:
        return self._low_precision(p)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Hide the owned gradients from torch's AdamW (it skips parameters without a
        # gradient), step the rest with it, then step the hidden ones.
        hidden: list[tuple[dict, Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and self._owns(group, p):
                    hidden.append((group, p, p.grad))
                    p.grad = None
        try:
            super().step()
        finally:
            for _, p, grad in hidden:
                p.grad = grad
        found_inf = getattr(self, "found_inf", None)
        if hidden and not (found_inf is not None and bool(found_inf)):
            self._step_low_precision(hidden, getattr(self, "grad_scale", None))
        return loss

    def _step_low_precision(self, items: list[tuple[dict, Tensor, Tensor]],
                            grad_scale: Tensor | None) -> None:
        raise NotImplementedError


class CompensatedAdamW(_SplitAdamW):
    """``torch.optim.AdamW`` with compensated updates of bf16/fp16 parameters.

    Args:
        params, lr, betas, eps, weight_decay, fused, foreach: as ``torch.optim.AdamW``.
        compensation: ``"kahan"`` (state ``"compensation"``, parameter dtype) or
            ``"fp32-master"`` (state ``"master"``, float32).
        chunk_elements: values updated at once in a low-precision parameter.

    Low-precision parameters keep ``exp_avg`` / ``exp_avg_sq`` in their own dtype, as
    ``torch.optim.AdamW`` does; the arithmetic is float32.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 compensation: str = "kahan", chunk_elements: int = DEFAULT_CHUNK,
                 fused: bool | None = None, foreach: bool | None = None) -> None:
        if compensation not in COMPENSATIONS:
            raise ValueError(f"compensation: must be one of {', '.join(COMPENSATIONS)}; "
                             f"got {compensation!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements: must be positive, got {chunk_elements}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         fused=fused, foreach=foreach)
        self.compensation = compensation
        self.chunk_elements = chunk_elements

    def _step_low_precision(self, items: list[tuple[dict, Tensor, Tensor]],
                            grad_scale: Tensor | None) -> None:
        for group, p, grad in items:
            self._update(group, p, grad, grad_scale)

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.compensation == "kahan":
                state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state["master"] = p.detach().float().clone()
        return state

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor,
                grad_scale: Tensor | None = None) -> None:
        if grad.is_sparse:
            raise RuntimeError("CompensatedAdamW does not support sparse gradients")
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("CompensatedAdamW supports neither amsgrad nor maximize")
        state = self._state(p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        step_size = lr / (1 - beta1**step)
        root_bias2 = math.sqrt(1 - beta2**step)
        kahan = self.compensation == "kahan"
        extra = state["compensation" if kahan else "master"]
        flat = [t.view(-1) for t in (p.data, grad, state["exp_avg"], state["exp_avg_sq"], extra)]
        for start in range(0, p.numel(), self.chunk_elements):
            end = min(start + self.chunk_elements, p.numel())
            pc, gc, mc, vc, xc = (t[start:end] for t in flat)
            g = gc.float() if grad_scale is None else gc.float().div_(grad_scale)
            m = mc.float().mul_(beta1).add_(g, alpha=1 - beta1)
            v = vc.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            del g
            mc.copy_(m)
            vc.copy_(v)
            v.sqrt_().div_(root_bias2).add_(eps)
            delta = m.div_(v).mul_(-step_size)
            del v
            if kahan:
                old = pc.float()
                if wd:
                    delta.add_(old, alpha=-lr * wd)
                delta.add_(xc.float())  # the rounding error carried from the last update
                new = old + delta
                pc.copy_(new)
                # what the rounded parameter failed to take of this update
                xc.copy_(delta.sub_(pc.float().sub_(old)))
            else:
                if wd:
                    xc.mul_(1 - lr * wd)
                xc.add_(delta)
                pc.copy_(xc)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``'s, but float32 master copies stay float32 (torch casts
        every floating state to its parameter's dtype)."""
        masters: dict[int, Tensor] = {}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, s in state_dict["state"].items():
            if "master" in s:
                masters[i] = s["master"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            if i in masters:
                self.state[p]["master"] = masters[i].to(device=p.device, dtype=torch.float32)


class LowBitAdamW(CompensatedAdamW):
    """torchao's ``AdamW8bit`` for the bf16/fp16 matrices (embedding, lm_head) and, with
    ``rotation_8bit``, for the float32 parameters of the ``"poet"`` group; Kahan-compensated
    AdamW (:class:`CompensatedAdamW`) for the other bf16/fp16 parameters (norms);
    ``torch.optim.AdamW`` for the remaining float32 ones. Needs the ``lowbit`` extra (torchao).

    torchao keeps 8-bit block-quantized Adam states (uint8 codes + one float32 scale per
    ``block_size`` values, for tensors of at least 4096 values that ``block_size`` divides;
    smaller ones keep states in their dtype) and rounds bf16 parameters stochastically, so
    small updates are kept in expectation. Its states live in the inner optimizer ``lowbit``;
    :meth:`state_dict` returns them under the outer parameter indices, each 8-bit state as
    plain tensors (``"exp_avg.codes"``, ``"exp_avg.scale"``, ``"exp_avg.qmap"`` and the bool
    ``"exp_avg.signed"``), so a checkpoint holds them exactly. The inner groups mirror this
    optimizer's and take their ``lr``, ``betas``, ``eps`` and ``weight_decay`` at every step.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int | None = None,
                 rotation_8bit: bool = False, chunk_elements: int = DEFAULT_CHUNK,
                 fused: bool | None = None, foreach: bool | None = None) -> None:
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ImportError("dense_optimizer 'adamw8bit' needs torchao: "
                              "pip install 'poetx[lowbit]'") from e
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         compensation="kahan", chunk_elements=chunk_elements,
                         fused=fused, foreach=foreach)
        self.rotation_8bit = rotation_8bit
        self._lowbit_ids: set[int] = set()
        self._mirrors: list[tuple[dict, dict]] = []
        inner_groups, outer = [], []
        for group in self.param_groups:
            mine = [p for p in group["params"] if self._wants_8bit(group, p)]
            self._lowbit_ids.update(id(p) for p in mine)
            if mine:
                outer.append(group)
                inner_groups.append({"params": mine, "lr": float(group["lr"]),
                                     "betas": group["betas"], "eps": group["eps"],
                                     "weight_decay": group["weight_decay"]})
        # torchao needs at least one parameter; a model without such parameters has no inner
        block_size = LOWBIT_BLOCK_SIZE if block_size is None else block_size
        self.lowbit = (AdamW8bit(inner_groups, lr=lr, betas=betas, eps=eps, block_size=block_size,
                                 bf16_stochastic_round=True) if inner_groups else None)
        if self.lowbit is not None:
            self._mirrors = list(zip(outer, self.lowbit.param_groups, strict=True))

    def _wants_8bit(self, group: dict, p: Tensor) -> bool:
        if self._low_precision(p):
            return p.ndim >= 2
        return self.rotation_8bit and group.get("name") == "poet"

    def _owns(self, group: dict, p: Tensor) -> bool:
        return self._low_precision(p) or id(p) in self._lowbit_ids

    def state_holder(self, p: Tensor) -> torch.optim.Optimizer:
        """The optimizer whose ``state`` holds ``p``'s state (``lowbit`` or this one)."""
        return self.lowbit if id(p) in self._lowbit_ids else self

    def _step_low_precision(self, items: list[tuple[dict, Tensor, Tensor]],
                            grad_scale: Tensor | None) -> None:
        compensated = [it for it in items if id(it[1]) not in self._lowbit_ids]
        super()._step_low_precision(compensated, grad_scale)
        if self.lowbit is None or len(compensated) == len(items):
            return
        if grad_scale is not None:
            for _, p, grad in items:
                if id(p) in self._lowbit_ids:
                    grad.div_(grad_scale.to(grad.dtype))
        for outer, inner in self._mirrors:
            inner["lr"].fill_(float(outer["lr"]))  # torchao keeps lr as a tensor
            for key in ("betas", "eps", "weight_decay"):
                inner[key] = outer[key]
        self._lowbit_step()

    @torch.no_grad()
    def _lowbit_step(self) -> None:
        """torchao's ``AdamW8bit.step`` (same state, same compiled per-tensor update), run on
        slices of at most ``LOWBIT_CHUNK`` values (whole quantization blocks, so the result
        is the unsliced one, up to the stochastic rounding's random draws)."""
        from torchao.optim.adam import single_param_adam

        opt = self.lowbit
        if getattr(self, "_compiled", None) is None:
            self._compiled = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
        with torch._dynamo.utils.disable_cache_limit():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = opt.state[p]
                    if len(state) == 0:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = opt._new_buffer(p, True)
                        state["exp_avg_sq"] = opt._new_buffer(p, False)
                    state["step"] += 1
                    stochastic = opt.bf16_stochastic_round and p.dtype is torch.bfloat16
                    for sl in _block_slices(p.numel(), opt.block_size, LOWBIT_CHUNK):
                        self._compiled(
                            p.detach().view(-1)[sl], p.grad.view(-1)[sl], state["step"],
                            _state_slice(state["exp_avg"], sl),
                            _state_slice(state["exp_avg_sq"], sl), None, group["lr"],
                            group["betas"][0], group["betas"][1], group["weight_decay"],
                            group["eps"], True, stochastic)

    def _outer_index(self) -> dict[int, int]:
        params = [p for g in self.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(params)}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.lowbit is None:
            return sd
        index = self._outer_index()
        for p, state in self.lowbit.state.items():
            flat: dict[str, Any] = {}
            for key, value in state.items():
                if hasattr(value, "codes") and hasattr(value, "qmap"):  # torchao OptimState8bit
                    flat[f"{key}.codes"] = value.codes
                    flat[f"{key}.scale"] = value.scale
                    flat[f"{key}.qmap"] = value.qmap
                    flat[f"{key}.signed"] = bool(value.signed)
                else:
                    flat[key] = value
            sd["state"][index[id(p)]] = flat
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; a missing or misshapen 8-bit tensor raises
        ``ValueError`` naming the parameter index and the state."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved = dict(state_dict["state"])
        inner: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(params):
            if id(p) in self._lowbit_ids and i in saved:
                inner[i] = saved.pop(i)
            elif i in saved and any("." in k for k in saved[i]):
                raise ValueError(f"optimizer state of parameter {i}: 8-bit states saved for a "
                                 f"parameter this optimizer keeps in full precision")
        for i, p in enumerate(params):
            if id(p) in self._lowbit_ids and i not in inner and i in saved:
                raise ValueError(f"optimizer state of parameter {i}: missing")
        super().load_state_dict({"state": saved, "param_groups": state_dict["param_groups"]})
        if self.lowbit is None:
            return
        self.lowbit.state.clear()
        for i, flat in inner.items():
            self.lowbit.state[params[i]] = _unflatten_8bit(flat, params[i], i)


def _block_slices(numel: int, block: int, chunk: int) -> list[slice]:
    """Slices of ``range(numel)`` of at most ``chunk`` values, on block boundaries."""
    step = max(block, chunk // block * block)
    return [slice(a, min(a + step, numel)) for a in range(0, numel, step)]


def _state_slice(state: Tensor, sl: slice) -> Tensor:
    """The flat slice ``sl`` of a state: a view of a plain tensor, or an ``OptimState8bit``
    over views of its codes and of the scales of those blocks (writes reach the state)."""
    if not hasattr(state, "codes"):
        return state.view(-1)[sl]
    from torchao.optim.subclass_8bit import OptimState8bit

    block = state.block_size
    return OptimState8bit(state.codes.view(-1)[sl], state.scale[sl.start // block:
                          -(-sl.stop // block)], state.qmap, state.signed, dtype=state.dtype)


def _unflatten_8bit(flat: dict[str, Any], p: Tensor, index: int) -> dict[str, Any]:
    from torchao.optim.subclass_8bit import OptimState8bit

    state: dict[str, Any] = {}
    names = {k.split(".", 1)[0] for k in flat}
    for name in sorted(names):
        where = f"optimizer state of parameter {index}, {name!r}"
        if name in flat:
            value = flat[name]
            if name == "step":
                state[name] = torch.as_tensor(value, dtype=torch.float32).reshape(()).cpu()
                continue
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{where}: shape {tuple(value.shape)}, the parameter has "
                                 f"{tuple(p.shape)}")
            state[name] = value.to(p.device)
            continue
        parts = {}
        for part in ("codes", "scale", "qmap", "signed"):
            if f"{name}.{part}" not in flat:
                raise ValueError(f"{where}: the 8-bit state lacks its {part!r}")
            parts[part] = flat[f"{name}.{part}"]
        codes, scale, qmap = (parts[k] for k in ("codes", "scale", "qmap"))
        if (codes.dtype != torch.uint8 or tuple(codes.shape) != tuple(p.shape)
                or scale.ndim != 1 or scale.numel() == 0 or codes.numel() % scale.numel()
                or qmap.dtype != torch.float32 or qmap.numel() != 256):
            raise ValueError(f"{where}: corrupt 8-bit state (codes {codes.dtype} "
                             f"{tuple(codes.shape)}, scale {tuple(scale.shape)}, qmap "
                             f"{tuple(qmap.shape)}; parameter {tuple(p.shape)})")
        state[name] = OptimState8bit(codes.to(p.device), scale.to(p.device, torch.float32),
                                     qmap.to(p.device), bool(parts["signed"]))
    return state


DENSE_OPTIMIZERS = ("adamw", "adamw-kahan", "adamw-fp32-master", "adamw8bit")


def make_dense_variant(name: str, groups: list[dict[str, Any]], rotation_8bit: bool = False,
                       **kwargs: Any) -> torch.optim.AdamW:
    """The optimizer of ``make_optimizer(..., dense_optimizer=name)`` over its ``groups``;
    ``rotation_8bit`` (``"adamw8bit"`` only): 8-bit states for the rotations too."""
    if rotation_8bit and name != "adamw8bit":
        raise ValueError(f"rotation_states '8bit': needs dense_optimizer 'adamw8bit' (torchao), "
                         f"got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if name in ("adamw-kahan", "adamw-fp32-master"):
        return CompensatedAdamW(groups, compensation=name.removeprefix("adamw-"), **kwargs)
    if name == "adamw8bit":
        return LowBitAdamW(groups, rotation_8bit=rotation_8bit, **kwargs)
    raise ValueError(f"dense_optimizer: must be one of {', '.join(DENSE_OPTIMIZERS)}; "
                     f"got {name!r}")
