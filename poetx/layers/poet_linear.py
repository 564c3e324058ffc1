"""``POETLinear``: an ``nn.Linear`` replacement trained by rotating a frozen weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.config import POETConfig
from poetx.kernels.block_rotate_ref import attach_inverse
from poetx.kernels.quant_ref import STORAGE_DTYPES, dequantize, num_groups, quantize
from poetx.ops.backend import rotation_delta
from poetx.ops.rotated_gemm import dense_w0, op_dtype, poet_linear, poet_linear_prebuilt
from poetx.ortho.cayley import num_skew_params, rotation_delta_reference
from poetx.ortho.init import normalized_gaussian
from poetx.ortho.layout import (
    BlockLayout,
    draw_permutation,
    layer_seed,
)

# Buffers holding what rounding ``W0`` lost (error feedback across merges); with
# ``w0_residual="host"`` they stay in CPU memory whatever device the module moves to.
_RESIDUAL_BUFFERS = ("w0_residual", "w0_residual_scale")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _zeros(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, pin: bool) -> Tensor:
    """Zeros on ``device``; page-locked when ``pin`` (fast merge-time copies), unless the host
    refuses to lock that much memory."""
    if pin:
        try:
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=True)
        except RuntimeError:
            pass
    return torch.zeros(shape, dtype=dtype, device=device)


class POETLinear(nn.Module):
    """``y = x (R W0 P)^T + bias`` with ``W0`` frozen and ``R``, ``P`` block-orthogonal.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``, as ``nn.Linear``.

    State (every tensor keeps its storage for the layer's life: merges write in place, so a
    captured CUDA graph stays valid across merges):
        w0: ``(out, in)`` frozen ``W0`` stored in the permuted frames
            (``w0[a, j] = W0[perm_out[a], perm_in[j]]``); a parameter with ``requires_grad=False``
            so that DDP does not broadcast it every step and FSDP can shard it. int8/fp8 storage
            adds ``w0_scale`` ``(out, ceil(in / quant_group_size))`` float32.
        w0_residual (+ ``w0_residual_scale``): what storing ``W0`` in low precision lost, in
            ``W0``'s format, added back at the next merge (``config.w0_residual``); ``None`` for
            float32/float64 ``W0`` or when turned off.
        theta_in / theta_out: ``(num_blocks, b(b-1)/2)`` float32 skew parameters of ``P`` and
            ``R`` (upper triangles only), zero after every merge.
        perm_in / perm_out: the current permutations ``(dim,)`` int64; index_in / index_out
            the same padded to ``(num_blocks * b,)`` with ``-1`` for phantom positions (what the
            op takes); inv_in / inv_out ``(dim,)`` int32: the position of each coordinate.
        merge_count: merges done so far. bias: ``(out,)`` trainable, or ``None``.
        rotation_group: the batched build this layer belongs to
            (``poetx.layers.rotation_groups.RotationGroup``) or ``None``; its ``blocks_for``
            gives ``(d_in, grad_in, d_out, grad_out)`` blocks and gradient handles, or ``None``
            (the layer builds its own).
        step_rotations: while the Trainer accumulates micro-batches, the step's blocks
            (``poetx.layers.rotation_groups.AccumulatedRotations``), ahead of
            ``rotation_group``; else ``None``.
        frame_in / frame_out: ``""``, or the key of a permutation this side shares with other
            layers' sides (``poetx.model.wrap`` gives an MLP's gate/up outputs and down input
            one, ``POETConfig.mlp_permutations="shared"``). A shared side draws its
            permutation from the key, so the layers sharing it hold equal ones as long as they
            merge together, and its activation travels in the permuted order: the input is
            taken, or the output returned, as ``x[..., perm]`` rather than ``x``.
        input_in_frame / output_in_frame: the input arrives, or the output leaves, in this
            layer's own permuted order (``x[..., perm_in]``, ``y[..., perm_out]``) without a
            shared permutation: the neighbour moves it between orders
            (``poetx.layers.framed_mlp``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: POETConfig | None = None,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight: Tensor | None = None,
        frame_in: str = "",
        frame_out: str = "",
    ) -> None:
        """``weight`` ``(out, in)``: starting ``W0`` in the original frame; ``None`` draws the
        normalized Gaussian init (on ``device``, seeded from ``config.seed`` and ``name``).
        ``frame_in`` / ``frame_out``: keys of shared permutations (see the class notes)."""
        super().__init__()
        self.config = config or POETConfig()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_name = name
        self.rotation_group = None
        self.step_rotations = None
        self.layout_in = BlockLayout.for_dim(in_features, self.config.block_size)
        self.layout_out = BlockLayout.for_dim(out_features, self.config.block_size)
        self.frame_in = frame_in
        self.frame_out = frame_out
        self.input_in_frame = False
        self.output_in_frame = False
        dtype = dtype or torch.get_default_dtype()
        self.compute_dtype = dtype
        # Skew parameters stay float32 under a bf16 model: their updates are far below bf16's
        # resolution around the parameter values. A float64 layer keeps float64 throughout.
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("merge_count", torch.zeros((), dtype=torch.int64, device=device))
        for side, layout in (("in", self.layout_in), ("out", self.layout_out)):
            self.register_buffer(f"perm_{side}",
                                 torch.empty(layout.dim, dtype=torch.int64, device=device))
            self.register_buffer(f"index_{side}",
                                 torch.empty(layout.padded_dim, dtype=torch.int64, device=device))
            self.register_buffer(f"inv_{side}",
                                 torch.empty(layout.dim, dtype=torch.int32, device=device))
        self._draw_permutations()
        self.theta_in = nn.Parameter(
            torch.zeros(self.layout_in.num_blocks, num_skew_params(self.layout_in.block),
                        device=device, dtype=param_dtype)
        )
        self.theta_out = nn.Parameter(
            torch.zeros(self.layout_out.num_blocks, num_skew_params(self.layout_out.block),
                        device=device, dtype=param_dtype)
        )
        fmt = self.config.w0_format
        storage = dtype if fmt == "auto" else STORAGE_DTYPES[fmt]
        self.w0 = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=storage),
            requires_grad=False,
        )
        groups = num_groups(in_features, self.config.quant_group_size)
        self.w0_scale: nn.Parameter | None = None
        if fmt != "auto":
            self.w0_scale = nn.Parameter(
                torch.empty(out_features, groups, device=device, dtype=torch.float32),
                requires_grad=False,
            )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        )
        self._register_residual(storage, groups, device)
        if weight is None:
            gen_device = torch.device(device) if device is not None else torch.device("cpu")
            gen = torch.Generator(device=gen_device)
            gen.manual_seed(layer_seed(self.config.seed, name, 0, "w0"))
            weight = normalized_gaussian(out_features, in_features, gen, gen_device)
        self.set_dense_weight(weight)

    def _register_residual(self, storage: torch.dtype, groups: int,
                           device: torch.device | str | None) -> None:
        place = self.config.w0_residual
        quantized = self.w0_scale is not None
        if place == "off" or not (quantized or storage in _LOW_PRECISION):
            self.w0_residual = self.w0_residual_scale = None
            return
        device = torch.device(device) if device is not None else torch.device("cpu")
        if place == "host":
            pin = device.type == "cuda"
            device = torch.device("cpu")
        else:
            pin = False
        shape = (self.out_features, self.in_features)
        self.register_buffer("w0_residual", _zeros(shape, storage, device, pin))
        scale = _zeros((self.out_features, groups), torch.float32, device, pin) if quantized \
            else None
        self.register_buffer("w0_residual_scale", scale)

    def _apply(self, fn, recurse=True):
        try:
            return self._apply_keeping_residual(fn, recurse)
        finally:
            self._attach_inverses()  # the buffers may be new tensors

    def _apply_keeping_residual(self, fn, recurse):
        if self.config.w0_residual != "host":
            return super()._apply(fn, recurse)
        # Keep the residual where it is (CPU): it is only read and written during merges.
        held = {k: self._buffers[k] for k in _RESIDUAL_BUFFERS
                if self._buffers.get(k) is not None}
        for k in held:
            self._buffers[k] = None
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._attach_inverses()  # loaded with the indices they invert
        # A state saved by a float32 layer (no residual) loads into a bf16 / int8 one: the
        # residual starts at zero, as for a freshly stored W0.
        for name in _RESIDUAL_BUFFERS:
            key = prefix + name
            if getattr(self, name) is not None and key in missing_keys:
                missing_keys.remove(key)
                getattr(self, name).zero_()

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: POETConfig | None = None,
                    name: str = "", frame_in: str = "", frame_out: str = "") -> POETLinear:
        """Convert ``linear``; with ``config.init == "keep"`` its function is unchanged
        (on a shared side, up to the permuted order the activation travels in)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        config = config or POETConfig()
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    config=config, name=name, device=weight.device, dtype=weight.dtype,
                    weight=weight.detach() if config.init == "keep" else None,
                    frame_in=frame_in, frame_out=frame_out)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def set_dense_weight(self, weight: Tensor) -> None:
        """Set ``W0`` to ``weight`` ``(out, in)`` (original frame); rotations are not touched."""
        if weight.shape != (self.out_features, self.in_features):
            expected = (self.out_features, self.in_features)
            raise ValueError(f"weight must be {expected}, got {tuple(weight.shape)}")
        weight = weight.to(self.perm_in.device)
        permuted = weight.index_select(0, self.perm_out).index_select(1, self.perm_in)
        del weight
        self._store_w0(permuted.to(self._wide_dtype()))

    def _wide_dtype(self) -> torch.dtype:
        return torch.float64 if self.compute_dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def _store_w0(self, permuted: Tensor) -> None:
        """Store ``(out, in)`` ``permuted`` (float32/64, permuted frame) into ``W0``'s existing
        storage, and what the rounding lost into the residual."""
        group = self.config.quant_group_size
        residual = self.w0_residual
        if self.w0_scale is None:
            self.w0.copy_(permuted)
            if residual is not None:
                # Round on W0's device: a float32 copy into a host bf16 buffer would cross
                # the bus at twice the size and convert on the CPU (7x slower at 8B, measured).
                residual.copy_((permuted - self.w0.to(permuted.dtype)).to(residual.dtype))
            return
        fmt = self.config.w0_format
        q, scale = quantize(permuted, fmt, group)
        self.w0.copy_(q)
        self.w0_scale.copy_(scale)
        if residual is not None:
            lost = permuted - dequantize(q, scale, group, permuted.dtype)
            rq, rscale = quantize(lost, fmt, group)
            residual.copy_(rq)
            self.w0_residual_scale.copy_(rscale)

    def _stored_w0(self, dtype: torch.dtype) -> Tensor:
        """``W0`` as stored plus the residual: the best value of ``W0`` (permuted, ``dtype``)."""
        group = self.config.quant_group_size
        w = dense_w0(self.w0, self.w0_scale, group, dtype)
        if self.w0_residual is None:
            return w
        res = self.w0_residual.to(self.w0.device, non_blocking=True)
        if self.w0_scale is None:
            return w + res.to(dtype)
        res_scale = self.w0_residual_scale.to(self.w0.device, non_blocking=True)
        return w + dequantize(res, res_scale, group, dtype)

    @torch.no_grad()
    def _draw_permutations(self) -> None:
        count = int(self.merge_count)
        for side, layout in (("in", self.layout_in), ("out", self.layout_out)):
            frame = getattr(self, f"frame_{side}")
            key, tag = (frame, "frame") if frame else (self.layer_name, side)
            perm = draw_permutation(layout.dim, layer_seed(self.config.seed, key, count, tag))
            getattr(self, f"perm_{side}").copy_(perm)
            index = getattr(self, f"index_{side}")
            index.fill_(-1)
            index[: layout.dim].copy_(perm)
            inv = torch.empty(layout.dim, dtype=torch.int32)
            inv[perm] = torch.arange(layout.dim, dtype=torch.int32)
            getattr(self, f"inv_{side}").copy_(inv)
        self._attach_inverses()

    def _attach_inverses(self) -> None:
        # The scatters by index_in / index_out read inv_in / inv_out instead of inverting the
        # index on every call (and in every captured step); each change of the indices here
        # changes the inverses with it, in place, so a captured graph stays right.
        for side in ("in", "out"):
            attach_inverse(getattr(self, f"index_{side}"), getattr(self, f"inv_{side}"))

    # forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._label()}: input has {x.shape[-1]} features in its last dimension, "
                f"expected {self.in_features} (input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: input must be floating point, got {x.dtype}")
        # Accumulating micro-batches: the step's blocks; else the decoder block's batched build.
        source = self.step_rotations if self.step_rotations is not None else self.rotation_group
        pre = source.blocks_for(self) if source is not None else None
        if pre is not None and pre[0].dtype == op_dtype(x):
            d_in, grad_in, d_out, grad_out = pre
            group = self.rotation_group
            copy = (group.shared_input(self, x) if group is not None and x.dtype == pre[0].dtype
                    else None)
            y = poet_linear_prebuilt(
                x, self.w0, self.w0_scale, self.config.quant_group_size, d_in, d_out, grad_in,
                grad_out, *self._op_indices(), self.config.mode == "fast", copy,
                self.saves_permuted_input,
            )
        else:
            y = poet_linear(
                x, self.w0, self.w0_scale, self.config.quant_group_size, self.theta_in,
                self.theta_out, *self._op_indices(), self.layout_in.block,
                self.layout_out.block, self.config.neumann_terms, self.config.mode == "fast",
                self.saves_permuted_input,
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _op_indices(self) -> tuple[Tensor | None, Tensor | None]:
        # A shared side's activation already travels permuted: no gather, no scatter.
        return (None if self.frame_in or self.input_in_frame else self.index_in,
                None if self.frame_out or self.output_in_frame else self.index_out)

    @property
    def saves_permuted_input(self) -> bool:
        """Whether backward keeps the input as the forward permuted it (``permuted_saves``;
        an input arriving permuted, on a shared side, is kept as it comes anyway)."""
        if self.frame_in or self.input_in_frame:
            return False
        if self.config.permuted_saves == "all":
            return True
        return (self.config.permuted_saves == "auto"
                and self.layer_name.rsplit(".", 1)[-1] == "down_proj")

    # dense views and merging --------------------------------------------------------------------
    def _label(self) -> str:
        return f"POETLinear {self.layer_name!r}" if self.layer_name else "POETLinear"

    def rotation_blocks(self, dtype: torch.dtype, exact: bool) -> tuple[Tensor, Tensor]:
        """The blocks of ``P`` and ``R``: ``(nb_in, b, b)``, ``(nb_out, b, b)`` in ``dtype``.

        ``exact=False``: the truncated Cayley-Neumann map the forward uses; ``exact=True``: the
        exact Cayley map ``(I + Q)(I - Q)^-1`` of the same ``Q``, orthogonal to rounding. For
        ``||Q|| < 1`` it is also the orthogonal polar factor of the truncated map, which equals
        ``C (I - Q^(k+1))`` with ``C`` the exact map."""
        out = []
        for theta, layout in ((self.theta_in, self.layout_in), (self.theta_out, self.layout_out)):
            if exact:
                wide = torch.float64 if dtype == torch.float64 else torch.float32
                delta = rotation_delta_reference(theta.detach().to(wide), layout.block, None,
                                                 layout.valid_last).to(dtype)
            else:
                delta = rotation_delta(theta.detach(), layout.block, self.config.neumann_terms,
                                       layout.valid_last, dtype)
            out.append(delta + torch.eye(layout.block, dtype=dtype, device=delta.device))
        return out[0], out[1]

    def _rotate_permuted(self, w: Tensor, p_blocks: Tensor, r_blocks: Tensor) -> Tensor:
        """``R_bd · w · P_bd`` for ``w`` ``(out, in)`` in the permuted frames, as two batched
        block products (``O(m n b)``; no dense block-diagonal matrix is formed)."""
        m, n = w.shape
        mp, np_ = self.layout_out.padded_dim, self.layout_in.padded_dim
        if (mp, np_) != (m, n):
            w = torch.nn.functional.pad(w, (0, np_ - n, 0, mp - m))
        bo, bi = self.layout_out.block, self.layout_in.block
        w = torch.bmm(r_blocks, w.view(mp // bo, bo, np_)).view(mp, np_)
        w = torch.einsum("mkj,kji->mki", w.view(mp, np_ // bi, bi), p_blocks).reshape(mp, np_)
        return w[:m, :n] if (mp, np_) != (m, n) else w

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``R · W0 · P`` ``(out, in)`` the forward computes, in the original frame and
        in ``dtype`` (default: the layer's dtype). For tests, export and plots."""
        dtype = dtype or self.compute_dtype
        wide = torch.float64 if dtype == torch.float64 else self._wide_dtype()
        p_blocks, r_blocks = self.rotation_blocks(wide, exact=False)
        w = self._rotate_permuted(dense_w0(self.w0, self.w0_scale, self.config.quant_group_size,
                                           wide), p_blocks, r_blocks)
        inv_out, inv_in = self.inv_out.long(), self.inv_in.long()
        return w.index_select(0, inv_out).index_select(1, inv_in).to(dtype)

    @torch.no_grad()
    def merge_(self) -> None:
        """``W0 <- C_R W0 C_P`` with the exact Cayley rotations of the trained ``Q`` (so ``W0``
        keeps its singular values through any number of merges), new permutations, skew
        parameters zeroed. In place: every tensor keeps its storage (the optimizer keeps
        referring to the same parameters; its state is handled by the schedule).

        The function changes by the difference between the truncated map the forward used and
        the exact one, ``R_k = C (I - Q^(k+1))``: relative change at most about
        ``||Q_R||^(k+1) + ||Q_P||^(k+1)`` (spectral norms)."""
        wide = self._wide_dtype()
        p_blocks, r_blocks = self.rotation_blocks(wide, exact=True)
        rotated = self._rotate_permuted(self._stored_w0(wide), p_blocks, r_blocks)
        del p_blocks, r_blocks
        old_inv_out, old_inv_in = self.inv_out.long(), self.inv_in.long()
        self.merge_count += 1
        self._draw_permutations()
        # New frame: new[a, j] = W[perm_out'[a], perm_in'[j]], and W[c, d] sits at
        # rotated[old_inv_out[c], old_inv_in[d]].
        rows = old_inv_out.index_select(0, self.perm_out)
        cols = old_inv_in.index_select(0, self.perm_in)
        self._store_w0(rotated.index_select(0, rows).index_select(1, cols))
        self.theta_in.zero_()
        self.theta_out.zero_()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``R W0 P`` (in the layer's dtype) and the bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.w0.device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def num_rotation_params(self) -> int:
        return self.theta_in.numel() + self.theta_out.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.config.block_size}, "
            f"mode={self.config.mode}, w0={self.w0.dtype}"
            + (f", frame_in={self.frame_in!r}" if self.frame_in else "")
            + (f", frame_out={self.frame_out!r}" if self.frame_out else "")
            + (", input_in_frame=True" if self.input_in_frame else "")
            + (", output_in_frame=True" if self.output_in_frame else "")
        )

