"""Configuration of the POET-X reparameterization.

``POETConfig`` is frozen: one instance is shared by every layer of a model, so a variant is
made with ``dataclasses.replace``. Its fields are declared with :func:`poetx.settings.setting`,
which also makes each of them a flag of ``poetx train`` and a key of its ``[poet]`` TOML table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from poetx.settings import (
    at_least,
    each,
    non_empty,
    non_negative,
    reject_unknown,
    setting,
    validate_fields,
)

MODES = ("fast", "mem")
INITS = ("normalized", "keep")
W0_FORMATS = ("auto", "int8", "fp8")
W0_RESIDUALS = ("host", "device", "off")
ADAM_RESTARTS = ("rewarm", "reset")
BATCH_ROTATIONS = ("auto", "on", "off")
SHARED_INPUTS = ("auto", "on", "off")
PERMUTED_SAVES = ("auto", "off", "all")
MLP_PERMUTATIONS = ("independent", "shared")
MLP_FRAMES = ("off", "fused")
MAX_NEUMANN_TERMS = 16


def _terms_or_exact(text: str) -> int | None:
    return None if text.strip().lower() in ("exact", "none") else int(text)


@dataclass(frozen=True)
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
            in the authors' kernel). ``None`` uses the exact inverse (slow: a
            batched solve, which CUDA graphs cannot capture; for tests and the ablation).
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
        batch_rotations: build the rotation blocks of all layers of a decoder block (each
            element of a ``ModuleList``) in one batched call at the start of its forward, and
            their skew gradients in one call in backward, instead of layer by layer (same
            values; fewer, fuller kernel launches). ``"auto"``: on for CUDA layers in "fast"
            mode. ``"on"`` also batches "mem" mode, which then keeps each layer's blocks for
            backward (``b^2`` values per block in the layer's dtype) instead of rebuilding them.
        shared_inputs: layers of a decoder block that run one after another on the same
            input (q/k/v, gate/up) get their permuted copies from one pass over it, and their
            input gradients go back in one summed scatter (``poetx.layers.shared_inputs``;
            same values). Needs the batched build. ``"auto"``: on CUDA; ``"on"``: also on CPU.
        permuted_saves: which layers keep their input for backward as the forward permuted it
            rather than as given (same values). Backward then reads it as it is, sparing a
            permutation pass over it, at no memory cost where nothing else keeps the input: an
            MLP's down projection, whose input ``act(gate) * up`` no other operation saves.
            ``"auto"``: layers named ``down_proj``; ``"off"``: none. (Elsewhere the input is
            usually kept by other operations too, or shared by sibling layers, and would then
            be kept twice.) ``"all"``: every layer, which spares backward a permutation pass
            over each input (five a Llama block besides ``down_proj``: q/k/v, gate/up, and
            ``o_proj``'s) for the memory of one more copy of each (q/k/v and gate/up keep their
            fan-out copies): 4.2 GiB for 1.2% of the step's time at Llama-8B, 4096 tokens.
        mlp_permutations: ``"independent"`` (the method as published): every layer draws its
            own permutations. ``"shared"``: in each MLP with ``gate_proj``, ``up_proj`` and
            ``down_proj`` (a Llama MLP: ``down(act(gate(x)) * up(x))``), the gate and up
            outputs and the down input share one permutation, redrawn at each merge, so the
            intermediate activation stays in the permuted order between them, which spares
            six permutation passes over it per step (same function for given permutations; a
            variant of the method's sampling of them). Needs only elementwise operations
            between the three layers; MLPs without all three (one excluded, say) keep
            independent permutations. Set at wrap time.
        mlp_frames: ``"fused"`` (the default): in each SwiGLU MLP with independent permutations
            (``poetx.layers.framed_mlp``), gate and up hand their outputs over in their own
            permuted orders and down takes its input in its own; one kernel moves the values
            between the three orders while it computes ``silu(gate) * up``, which spares the
            same six permutation passes as ``mlp_permutations="shared"`` without sharing the
            permutations (same values). ``"off"``: each layer gathers and scatters its own.
            Set at wrap time.
    """

    block_size: int = setting(256, "rotation block size b", check=at_least(2, 8192),
                              group="POET-X")
    merge_every: int = setting(200, "merge period T in steps", check=at_least(1),
                               group="POET-X")
    neumann_terms: int | None = setting(
        3, "Neumann series terms of the Cayley map ('exact': exact inverse, slow: "
        "a batched solve, and poetx train's CUDA steps run uncaptured)",
        check=at_least(1, MAX_NEUMANN_TERMS), group="POET-X", parse=_terms_or_exact,
        metavar="N|exact")
    mode: str = setting("fast", "fast (store the intermediate) or mem (recompute it)",
                        choices=MODES, group="POET-X")
    init: str = setting("normalized", "W0: normalized Gaussian, or keep the dense weights",
                        choices=INITS, group="POET-X")
    exclude: tuple[str, ...] = setting(
        help="fnmatch patterns of module names left dense", check=each(non_empty),
        group="POET-X", metavar="PATTERN", default_factory=tuple)
    seed: int = setting(0, "seed of the permutations (default: the run's --seed)",
                        check=at_least(0, 2**63 - 1), group="POET-X")
    w0_format: str = setting("auto", "storage of the frozen weights W0", choices=W0_FORMATS,
                             group="POET-X")
    quant_group_size: int = setting(256, "group size of the int8/fp8 scales of W0",
                                    check=at_least(16, 65536), group="POET-X")
    w0_residual: str = setting("host", "where the rounding residual of a low-precision W0 is "
                               "kept for error feedback at merges", choices=W0_RESIDUALS,
                               group="POET-X")
    max_q_norm: float = setting(1.0, "merge early when a block's ||Q||_F exceeds this (0: off)",
                                check=non_negative, group="POET-X")
    q_norm_check_every: int = setting(10, "steps between two checks of max_q_norm",
                                      check=at_least(1), group="POET-X")
    adam_restart: str = setting("rewarm", "rotation optimizer state at a merge: rewarm (zero "
                                "the first moment, average the second) or reset",
                                choices=ADAM_RESTARTS, group="POET-X")
    batch_rotations: str = setting("auto", "build the rotation blocks of a decoder block's "
                                   "layers in one batched call (auto: on CUDA in fast mode)",
                                   choices=BATCH_ROTATIONS, group="POET-X")
    shared_inputs: str = setting("auto", "permute an input that several layers of a block read "
                                 "in one pass for all of them (auto: on CUDA)",
                                 choices=SHARED_INPUTS, group="POET-X")
    permuted_saves: str = setting("auto", "layers that keep their input permuted for backward "
                                  "(auto: down_proj, whose input nothing else keeps; all: "
                                  "every layer, one more copy of each input)",
                                  choices=PERMUTED_SAVES, group="POET-X")
    mlp_permutations: str = setting("independent", "permutations of an MLP's gate/up outputs "
                                    "and down input: independent (as published) or shared (one "
                                    "for the three, fewer permutation passes)",
                                    choices=MLP_PERMUTATIONS, group="POET-X")
    mlp_frames: str = setting("fused", "fused: an MLP's gate/up outputs and down input stay in "
                              "their layers' permuted orders, one SwiGLU kernel moves values "
                              "between them (same values, fewer passes)",
                              choices=MLP_FRAMES, group="POET-X")

    def __post_init__(self) -> None:
        # TOML and JSON give lists; a lone pattern may come as a string.
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if isinstance(exclude, list):
            exclude = tuple(exclude)
        object.__setattr__(self, "exclude", exclude)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of its allowed range."""
        validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "POETConfig") -> POETConfig:
        reject_unknown(cls, d, source)
        return cls(**d)
