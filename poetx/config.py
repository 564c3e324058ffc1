"""Configuration of the POET-X reparameterization."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("fast", "mem")
INITS = ("normalized", "keep")
W0_FORMATS = ("auto", "int8", "fp8")
W0_RESIDUALS = ("host", "device", "off")
ADAM_RESTARTS = ("rewarm", "reset")
MAX_NEUMANN_TERMS = 16


@dataclass
class POETConfig:
    """How linear layers are reparameterized as ``W = R · W0 · P``.

    Attributes:
        block_size: side ``b`` of the diagonal blocks of ``R`` and ``P``. A dimension it does not
            divide gets a last block padded with identity; a dimension smaller than ``b`` uses one
            block of that dimension.
        merge_every: steps ``T`` between merges (``W0 <- R W0 P``, new permutations, skew
            parameters and their optimizer state reset).
        neumann_terms: highest power ``k`` of the truncated Neumann series replacing
            ``(I - Q)^-1`` in the Cayley map (``k = 3`` gives ``I + 2Q + 2Q^2 + 2Q^3 + Q^4``, as
            in the authors' kernel). ``None`` uses the exact inverse (slow; for tests).
        mode: ``"fast"`` saves the intermediate activation for backward, ``"mem"`` recomputes it
            so that a layer saves no more than a dense layer (its input).
        init: ``"normalized"`` draws ``W0`` as a Gaussian with unit-norm rows (each neuron on the
            sphere); ``"keep"`` starts from the wrapped layer's weight, so the function is
            unchanged at step 0.
        exclude: ``fnmatch`` patterns of module names (full dotted name or last component) that
            stay dense. ``lm_head`` and embeddings are never wrapped.
        seed: base seed of the permutations; each layer's generator is seeded from it, the layer
            name and the merge counter, so ranks and resumed runs draw the same permutations.
        w0_format: storage of ``W0``: ``"auto"`` (the layer's dtype), ``"int8"`` (group-wise
            scales) or ``"fp8"`` (e4m3 with scales).
        quant_group_size: group size of the scales for ``int8``/``fp8`` storage (columns per
            scale; the last group of a row is shorter when it does not divide the width).
        w0_residual: where the rounding residual of a low-precision ``W0`` (bf16/fp16, int8,
            fp8) is kept: each merge stores ``R W0 P`` rounded and keeps what the rounding lost,
            in ``W0``'s own format, to add back at the next merge (error feedback), so rounding
            errors do not accumulate over merges. ``"host"`` keeps it in CPU memory (moved to
            the device only during a merge), ``"device"`` beside ``W0``, ``"off"`` drops it
            (each merge then adds a fresh rounding error). Unused for float32/float64 ``W0``.
        max_q_norm: merge early when the largest Frobenius norm of any block's ``Q`` exceeds
            this (the truncated Cayley map is only near-orthogonal for small ``Q``); ``0``
            disables the guard.
        q_norm_check_every: steps between two checks of ``max_q_norm`` (each check reads one
            number from the device).
        adam_restart: what a merge does to the optimizer state of the skew parameters:
            ``"rewarm"`` zeroes the first moment and replaces each tensor's second moment by
            its mean (so the first updates after a merge ramp up over about ``1/(1-beta1)``
            steps instead of moving every entry by ``lr`` at once); ``"reset"`` clears it as
            the authors do. Both in place.
    """

    block_size: int = 256
    merge_every: int = 200
    neumann_terms: int | None = 3
    mode: str = "fast"
    init: str = "normalized"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    w0_format: str = "auto"
    quant_group_size: int = 256
    w0_residual: str = "host"
    max_q_norm: float = 1.0
    q_norm_check_every: int = 10
    adam_restart: str = "rewarm"

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of its allowed range."""
        _check_int("block_size", self.block_size, low=2, high=8192)
        _check_int("merge_every", self.merge_every, low=1, high=None)
        if self.neumann_terms is not None:
            _check_int("neumann_terms", self.neumann_terms, low=1, high=MAX_NEUMANN_TERMS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("init", self.init, INITS)
        _check_choice("w0_format", self.w0_format, W0_FORMATS)
        _check_int("quant_group_size", self.quant_group_size, low=16, high=65536)
        _check_choice("w0_residual", self.w0_residual, W0_RESIDUALS)
        if (isinstance(self.max_q_norm, bool) or not isinstance(self.max_q_norm, int | float)
                or not 0 <= self.max_q_norm < float("inf")):
            raise ValueError(f"max_q_norm: must be a finite number >= 0, got {self.max_q_norm!r}")
        _check_int("q_norm_check_every", self.q_norm_check_every, low=1, high=None)
        _check_choice("adam_restart", self.adam_restart, ADAM_RESTARTS)
        _check_int("seed", self.seed, low=0, high=2**63 - 1)
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"exclude: patterns must be non-empty strings, got {pattern!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> POETConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"POETConfig: unknown fields {unknown}")
        if "exclude" in known:
            known["exclude"] = tuple(known["exclude"])
        return cls(**known)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    upper = "" if high is None else f" and at most {high}"
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: must be at least {low}{upper}, got {value}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
