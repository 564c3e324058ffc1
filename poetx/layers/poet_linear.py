"""``POETLinear``: an ``nn.Linear`` replacement trained by rotating a frozen weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poetx.config import POETConfig
from poetx.kernels.quant_ref import STORAGE_DTYPES, quantize
from poetx.ops.backend import rotation_delta
from poetx.ops.rotated_gemm import dense_w0, poet_linear
from poetx.ortho.cayley import num_skew_params
from poetx.ortho.init import normalized_gaussian
from poetx.ortho.layout import (
    BlockLayout,
    draw_permutation,
    inverse_permutation,
    layer_seed,
)


class POETLinear(nn.Module):
    """``y = x (R W0 P)^T + bias`` with ``W0`` frozen and ``R``, ``P`` block-orthogonal.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``, as ``nn.Linear``.

    State:
        w0: ``(out, in)`` frozen ``W0`` stored in the permuted frames
            (``w0[a, j] = W0[perm_out[a], perm_in[j]]``); a parameter with ``requires_grad=False``
            so that DDP does not broadcast it every step and FSDP can shard it. int8/fp8 storage
            adds ``w0_scale`` ``(out, groups)``.
        theta_in / theta_out: ``(num_blocks, b(b-1)/2)`` float32 skew parameters of ``P`` and
            ``R`` (upper triangles only), zero after every merge.
        perm_in / perm_out: the current permutations; ``merge_count``: merges done so far.
        bias: ``(out,)`` ordinary trainable parameter, or ``None``.
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
    ) -> None:
        """``weight`` ``(out, in)``: starting ``W0`` in the original frame; ``None`` draws the
        normalized Gaussian init (on ``device``, seeded from ``config.seed`` and ``name``)."""
        super().__init__()
        self.config = config or POETConfig()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_name = name
        self.layout_in = BlockLayout.for_dim(in_features, self.config.block_size)
        self.layout_out = BlockLayout.for_dim(out_features, self.config.block_size)
        dtype = dtype or torch.get_default_dtype()
        self.compute_dtype = dtype
        # Skew parameters stay float32 under a bf16 model: their updates are far below bf16's
        # resolution around the parameter values. A float64 layer keeps float64 throughout.
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("merge_count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("perm_in", torch.empty(in_features, dtype=torch.int64, device=device))
        self.register_buffer(
            "perm_out", torch.empty(out_features, dtype=torch.int64, device=device)
        )
        self._draw_permutations()
        self.theta_in = nn.Parameter(
            torch.zeros(self.layout_in.num_blocks, num_skew_params(self.layout_in.block),
                        device=device, dtype=param_dtype)
        )
        self.theta_out = nn.Parameter(
            torch.zeros(self.layout_out.num_blocks, num_skew_params(self.layout_out.block),
                        device=device, dtype=param_dtype)
        )
        self.w0 = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype),
            requires_grad=False,
        )
        self.w0_scale: nn.Parameter | None = None
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        )
        if weight is None:
            gen_device = torch.device(device) if device is not None else torch.device("cpu")
            gen = torch.Generator(device=gen_device)
            gen.manual_seed(layer_seed(self.config.seed, name, 0, "w0"))
            weight = normalized_gaussian(out_features, in_features, gen, gen_device)
        self.set_dense_weight(weight)

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: POETConfig | None = None,
                    name: str = "") -> POETLinear:
        """Convert ``linear``; with ``config.init == "keep"`` its function is unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        config = config or POETConfig()
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    config=config, name=name, device=weight.device, dtype=weight.dtype,
                    weight=weight.detach() if config.init == "keep" else None)
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
        permuted = weight.to(self.perm_in.device)[self.perm_out][:, self.perm_in]
        del weight
        self._store_w0(permuted)

    def _store_w0(self, permuted: Tensor) -> None:
        fmt = self.config.w0_format
        if fmt == "auto":
            _assign_(self.w0, permuted.to(self.compute_dtype))
            return
        q, scale = quantize(permuted, fmt, self.config.quant_group_size)
        assert q.dtype == STORAGE_DTYPES[fmt]
        _assign_(self.w0, q)
        if self.w0_scale is None:
            self.w0_scale = nn.Parameter(scale, requires_grad=False)
        else:
            _assign_(self.w0_scale, scale)

    def _draw_permutations(self) -> None:
        count = int(self.merge_count)
        for side, buf, dim in (("in", self.perm_in, self.in_features),
                               ("out", self.perm_out, self.out_features)):
            seed = layer_seed(self.config.seed, self.layer_name, count, side)
            buf.copy_(draw_permutation(dim, seed))

    # forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._label()}: input has {x.shape[-1]} features in its last dimension, "
                f"expected {self.in_features} (input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: input must be floating point, got {x.dtype}")
        y = poet_linear(
            x, self.w0, self.w0_scale, self.theta_in, self.theta_out,
            self.layout_in.padded_index(self.perm_in), self.layout_out.padded_index(self.perm_out),
            self.layout_in.block, self.layout_out.block, self.config.neumann_terms,
            self.config.mode == "fast",
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # dense views and merging --------------------------------------------------------------------
    def _label(self) -> str:
        return f"POETLinear {self.layer_name!r}" if self.layer_name else "POETLinear"

    def _blocks(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Dense block-diagonal ``P`` and ``R`` in the permuted frames (padded, ``dtype``)."""
        mats = []
        for theta, layout in ((self.theta_in, self.layout_in), (self.theta_out, self.layout_out)):
            delta = rotation_delta(theta.detach().to(dtype), layout.block,
                                   self.config.neumann_terms, layout.valid_last, dtype)
            eye = torch.eye(layout.block, dtype=dtype, device=delta.device)
            mats.append(torch.block_diag(*(eye + delta)))
        return mats[0], mats[1]

    @torch.no_grad()
    def _rotated_w0_permuted(self, dtype: torch.dtype) -> Tensor:
        """``R_bd · W0s · P_bd`` ``(out, in)`` in the current permuted frames."""
        p_bd, r_bd = self._blocks(dtype)
        w = dense_w0(self.w0, self.w0_scale, dtype)
        m, n = w.shape
        w = torch.nn.functional.pad(
            w, (0, self.layout_in.padded_dim - n, 0, self.layout_out.padded_dim - m)
        )
        return (r_bd @ w @ p_bd)[:m, :n]

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``R · W0 · P`` ``(out, in)`` in the original frame (tests and export only)."""
        dtype = dtype or torch.float32
        w = self._rotated_w0_permuted(dtype)
        return w[inverse_permutation(self.perm_out)][:, inverse_permutation(self.perm_in)]

    @torch.no_grad()
    def merge_(self) -> None:
        """``W0 <- R W0 P``; draw new permutations; zero the skew parameters (in place, so the
        optimizer keeps referring to the same tensors; its state is cleared by the schedule)."""
        merged = self.effective_weight(
            torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        )
        self.merge_count += 1
        self._draw_permutations()
        self.set_dense_weight(merged)
        self.theta_in.zero_()
        self.theta_out.zero_()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``R W0 P`` (in the layer's dtype) and the bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.w0.device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight(torch.float32))
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
        )


def _assign_(param: nn.Parameter, value: Tensor) -> None:
    """Overwrite ``param`` with ``value``: in place when shape, dtype and device match (a merge,
    so captured CUDA graphs and optimizer references stay valid), else by replacing its data
    (construction, where ``param`` is still an uninitialized placeholder)."""
    d = param.data
    if d.shape == value.shape and d.dtype == value.dtype and d.device == value.device:
        d.copy_(value)
    else:
        param.data = value.contiguous()
