"""Peak GPU memory of one training step, predicted from the shapes and the code's tensors.

The prediction is what ``torch.cuda.max_memory_allocated()`` reports over a steady-state step
(forward, ``causal_lm_loss`` backward, optimizer step, ``zero_grad(set_to_none=True)``) of a
preset built as ``bench/model.py`` and ``poetx train`` build it. It is not a fit: every term
is a tensor the code allocates, sized from the shapes, and the peak is the largest of the
moments where memory can be highest:

- ``loss-backward``: all saved activations are alive and ``chunked_cross_entropy`` holds the
  head gradient (``V x d``, model dtype, written chunk of rows by chunk of rows), a float32
  accumulator of the hidden gradient (``T x d x 4``) and one vocabulary chunk's logits in the
  model dtype and float32;
- ``layer-backward``: the last and the first decoder layer under backward, with the layer's
  activations (recomputed under checkpointing), the gradients accumulated so far and the
  temporaries of one POET-X linear backward (rotation blocks, dequantized ``W0``, ``T x m``
  buffers, Cayley-Neumann scratch);
- ``embedding-backward``: the end of backward: every rotation (or dense) gradient, the
  norms', the embedding's fresh gradient and the gradient flowing into it;
- ``optimizer-step``: every gradient and optimizer state, and the optimizer's scratch: none
  for torch's fused AdamW; five float32 slices of ``COMPENSATED_CHUNK`` values for the
  compensated update; none for torchao's compiled 8-bit step (one fused kernel per tensor).
  With ``step_in_backward`` the embedding and lm_head gradients are stepped and freed as they
  are written, so they are in none of the later moments.
- ``outside the graph`` (``cuda_graphs`` only): a captured step's private memory pool keeps
  the step's peak reserved for the whole run, so the merge and evaluation, which run outside
  the graph, allocate on top of it (their temporaries: one linear's float32 merge product and
  one evaluation forward).

Gradient accumulation (``grad_accum`` K > 1, ``poetx.layers.rotation_groups.AccumulatedRotations``)
is predicted at its last micro-batch, which holds what the earlier ones left: the rotation
blocks of every layer, built once for the step (``accumulated_blocks``: one model-dtype
``(sum nb, b, b)`` tensor per build call, padded last blocks included, and two float32
scalars per call, the handles' anchor and the leaf they hang from; in fast mode these are the
blocks the layers save, no longer counted in their activations; in mem mode they are not
rebuilt in backward), the float32 sum of their gradients (``block_grads``: one
``(sum nb, b, b)`` buffer per build call, the ``Carry``'s sink that the Grams add into) and
the gradients of the ordinary parameters (embedding, lm_head, norms; AdamW's linears too),
accumulated in place, so a fresh gradient of the embedding (and of a
dense linear) is written beside its accumulated one. The skew parameters' gradients appear
only in the last micro-batch's backward, as with K = 1. A further moment, ``rotation-link``,
is the Cayley-Neumann backward of the largest build call of the first layer on the summed
gradient. The accumulation tensors are freed before the optimizer step.

Persistent extras: ``w0_residual = "device"`` keeps the rounding residual of a low-precision
``W0`` beside it (``W0``'s size again); ``"host"`` and ``"off"`` keep none on the device.

Saved activations follow the code: Hugging Face ``LlamaDecoderLayer`` with SDPA (flash)
attention saves, per token, the float32 input copy and the normalized bf16 value of each
``RMSNorm`` (plus its output, saved by the next linear), the rotated ``q`` and ``k``, ``v``, the
attention output and its log-sum-exp, and four ``T x I`` MLP tensors (gate, its SiLU, up, their
product). POET-X ``mem`` saves the same input per linear as ``nn.Linear``; ``fast`` adds the
intermediate ``v`` (``T x m``) and the rotation blocks (``nb x b x b``) of each side. Gradient
checkpointing keeps only each layer's input, and recomputes one layer at a time in backward.
Blocks compiled by ``poetx.model.compile_blocks`` (``poetx train``'s default for a captured
step, ``Setting.compile_blocks``) keep no float32 copy of their two norms' inputs, ``8 d``
bytes per token and layer less: what AOTAutograd's min-cut partition (inductor's) saves for a
small Llama on CPU, exactly (``tests/test_plan.py``); measured on an H100 at Llama-8B fast,
1.07 GiB less at 1 x 1024 and 4.0 GiB at 2 x 2048, 34 and 32 KB per token and layer against
the 32 KB of ``8 d`` (``bench/results/step_h100.json``).

Constants that are not shapes (stated, not fitted to the measurements):

- ``CUBLAS_WORKSPACE``: cuBLAS takes 32 MiB of workspace per (handle, stream) through the
  caching allocator on Hopper; forward GEMMs run on the Python thread and backward GEMMs on
  autograd's device thread, so a step holds two.
- Allocator rounding (:func:`block_bytes`): the caching allocator rounds requests to 512 bytes,
  serves those of 10 MiB or more from segments rounded to 2 MiB, and does not split off a
  remainder of 1 MiB or less, so such a tensor occupies the whole rounded block.
- ``CUDA_CONTEXT`` and ``RESERVE_FRACTION`` (used by fit checks only, not in the prediction):
  the CUDA context and kernels' memory outside the allocator, and a margin for the allocator's
  reserved-but-free blocks.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from poetx.config import MLP_FRAMES, MLP_PERMUTATIONS, PERMUTED_SAVES
from poetx.model.loss_chunks import LOGITS_BUDGET, auto_chunk_tokens, keeps_logits, vocab_chunk

Round = Callable[[int], int]

MIB = 1 << 20
GIB = 1 << 30
CUBLAS_WORKSPACE = 32 * MIB
GEMM_THREADS = 2
CUDA_CONTEXT = 0.6 * GIB
RESERVE_FRACTION = 0.03

# torch.cuda caching allocator (c10/cuda/CUDACachingAllocator.cpp)
_ROUND = 512
_SMALL_SIZE = 1 * MIB
_MIN_LARGE_ALLOC = 10 * MIB
_ROUND_LARGE = 2 * MIB
_LARGE_BUFFER = 20 * MIB

OPTIMIZERS = ("poetx", "adamw")
MODES = ("fast", "mem")
W0_FORMATS = ("auto", "int8", "fp8")
DENSE_OPTIMIZERS = ("adamw", "adamw-kahan", "adamw-fp32-master", "adamw8bit")
ROTATION_STATES = ("fp32", "8bit")
# "fused": poetx.model.lm_loss today (the cross-entropy kernels; a batch's logits kept for
# backward where they fit); "vocab-chunked": the loss of issue 13 (float32 copies of each
# chunk's logits, logits always recomputed in backward); "token-chunked": the loss before
# issue 13 (float32 head gradient). The older two check the planner against recorded peaks.
LOSSES = ("fused", "vocab-chunked", "token-chunked")
W0_RESIDUALS = ("host", "device", "off")
# torchao AdamW8bit: tensors of at least this many values that the block divides get 8-bit
# states (uint8 codes, one float32 scale per block and a 256-entry float32 code table each)
LOWBIT_MIN = 4096
LOWBIT_BLOCK = 256
LOWBIT_QMAP_BYTES = 256 * 4
# poetx.optim.dense_update.LOWBIT_CHUNK: values per slice of the 8-bit step, which holds two
# float32 buffers of a slice (what torchao's compiled update materializes)
LOWBIT_CHUNK = 1 << 24
LOWBIT_SCRATCH_SLICES = 2

PARTS = (
    "w0",
    "w0_residual",
    "dense_linear_weights",
    "dense_linear_grads",
    "dense_linear_states",
    "embed_head_norm_weights",
    "embed_head_norm_grads",
    "embed_head_norm_states",
    "rotation_params",
    "rotation_grads",
    "rotation_states",
    "buffers",
    "activations",
    "loss_temporaries",
    "backward_temporaries",
    "optimizer_temporaries",
    "accumulated_blocks",
    "block_grads",
    "overhead",
)


@dataclass(frozen=True)
class Setting:
    """How a run trains, as far as memory is concerned.

    Attributes:
        optimizer: ``"poetx"`` (linears reparameterized) or ``"adamw"`` (dense baseline).
        mode: POET-X ``"fast"`` (saves ``v`` and the rotation blocks) or ``"mem"``.
        checkpointing: activation checkpointing of the decoder blocks.
        w0_format: ``"auto"`` (the model dtype), ``"int8"`` or ``"fp8"`` (+ float32 scales).
        block_size: rotation block size ``b``.
        quant_group_size: columns per scale of int8/fp8 ``W0``.
        dense_optimizer: update of the ordinary parameters (embedding, lm_head, norms):
            ``"adamw"`` (torch fused AdamW, states in the parameter dtype), ``"adamw-kahan"``
            (+ a compensation buffer in the parameter dtype), ``"adamw-fp32-master"``
            (+ a float32 master copy), ``"adamw8bit"`` (torchao 8-bit states, block 256,
            for embedding and lm_head; Kahan-compensated bf16 states for norms).
        rotation_states: ``"fp32"`` or ``"8bit"`` (torchao) Adam states of the rotations.
        step_in_backward: embedding and lm_head stepped (and their gradients freed) inside
            backward.
        w0_residual: where the rounding residual of a low-precision ``W0`` lives
            (``"device"`` costs ``W0``'s size again).
        cuda_graphs: the step is replayed as a CUDA graph (its pool stays reserved).
        loss: ``"fused"`` (the code's loss), ``"vocab-chunked"`` (the loss of issue 13, with
            float32 copies of its logits) or ``"token-chunked"`` (the loss before issue 13,
            with a float32 head gradient); the older two for recorded rows.
        grad_accum: micro-batches per optimizer step (``--grad-accum``); the batch size
            given to :func:`predict` is one micro-batch's.
        compile_blocks: the decoder blocks are compiled around their POET layers
            (``poetx.model.compile_blocks``; ``poetx train`` does it where the step is a CUDA
            graph, so it counts only with ``cuda_graphs`` and POET-X).
        permuted_saves: ``"auto"``: POET-X's ``down_proj`` keeps its input permuted, padded to
            whole blocks (``POETConfig.permuted_saves``); ``"off"``: as given; ``"all"``:
            every linear keeps a permuted copy, and the norms' outputs are no longer kept.
        mlp_permutations: ``POETConfig.mlp_permutations``; ``"shared"``: ``down_proj``'s input
            arrives permuted and is kept as it comes, unpadded.
        mlp_frames: ``POETConfig.mlp_frames``; ``"fused"`` (with independent permutations):
            the frame-SwiGLU node keeps gate's and up's outputs, ``down_proj`` its input as it
            comes, unpadded; nothing keeps the SiLU's output.
    """

    optimizer: str = "poetx"
    mode: str = "mem"
    checkpointing: bool = False
    w0_format: str = "auto"
    block_size: int = 256
    quant_group_size: int = 256
    dense_optimizer: str = "adamw"
    rotation_states: str = "fp32"
    step_in_backward: bool = False
    w0_residual: str = "host"
    cuda_graphs: bool = False
    loss: str = "fused"
    grad_accum: int = 1
    compile_blocks: bool = False
    permuted_saves: str = "auto"
    mlp_permutations: str = "independent"
    mlp_frames: str = "fused"

    @property
    def blocks_compiled(self) -> bool:
        """Whether the decoder blocks run compiled: only a captured POET-X step compiles them,
        and not under activation checkpointing, whose ``checkpoint`` disables dynamo for
        everything it calls (the blocks then run eager, their norms' float32 copies saved)."""
        return (self.compile_blocks and self.cuda_graphs and self.optimizer == "poetx"
                and not self.checkpointing)

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("mode", self.mode, MODES)
        _choice("w0_format", self.w0_format, W0_FORMATS)
        _choice("dense_optimizer", self.dense_optimizer, DENSE_OPTIMIZERS)
        _choice("rotation_states", self.rotation_states, ROTATION_STATES)
        _choice("w0_residual", self.w0_residual, W0_RESIDUALS)
        _choice("loss", self.loss, LOSSES)
        _choice("permuted_saves", self.permuted_saves, PERMUTED_SAVES)
        _choice("mlp_permutations", self.mlp_permutations, MLP_PERMUTATIONS)
        _choice("mlp_frames", self.mlp_frames, MLP_FRAMES)
        for name in ("block_size", "quant_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name}: must be an integer of at least 2, got {value!r}")
        k = self.grad_accum
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"grad_accum: must be a positive integer, got {k!r}")
        if k > 1 and self.step_in_backward:
            raise ValueError("step_in_backward: needs grad_accum 1 (the Trainer refuses to step "
                             f"inside backward on a partial gradient), got grad_accum {k}")

    @property
    def name(self) -> str:
        """Short label, e.g. ``poetx-mem-ckpt-int8-b256`` or ``adamw``."""
        parts = [self.optimizer]
        if self.optimizer == "poetx":
            parts.append(self.mode)
        if self.checkpointing:
            parts.append("ckpt")
        if self.optimizer == "poetx":
            if self.w0_format != "auto":
                parts.append(self.w0_format)
            parts.append(f"b{self.block_size}")
        if self.dense_optimizer != "adamw":
            parts.append(self.dense_optimizer.replace("adamw-", "").replace("adamw", ""))
        if self.optimizer == "poetx" and self.rotation_states != "fp32":
            parts.append(f"rot{self.rotation_states}")
        if self.step_in_backward:
            parts.append("inbwd")
        if self.optimizer == "poetx" and self.w0_residual == "device":
            parts.append("resdev")
        if self.cuda_graphs:
            parts.append("graph")
        if self.blocks_compiled:
            parts.append("compiled")
        if self.optimizer == "poetx" and self.permuted_saves != "auto":
            parts.append(f"permsave{self.permuted_saves}")
        if self.grad_accum > 1:
            parts.append(f"accum{self.grad_accum}")
        return "-".join(parts)


@dataclass(frozen=True)
class ModelShape:
    """What the prediction needs of a Llama model (``poetx.model.llama.LlamaShape`` fields)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, out m, in n)`` of one decoder layer's linears, in forward order."""
        d, kv, q = self.hidden, self.kv_heads * self.head_dim, self.heads * self.head_dim
        i = self.intermediate
        return [("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q),
                ("gate_proj", i, d), ("up_proj", i, d), ("down_proj", d, i)]


@dataclass
class MemoryPlan:
    """A predicted peak and its parts (bytes). ``sum(parts.values()) == peak_bytes``;
    ``moments`` holds the parts at every moment considered (``phase`` is the largest)."""

    preset: str
    seq_len: int
    batch_size: int
    setting: Setting
    peak_bytes: int
    phase: str
    parts: dict[str, int] = field(default_factory=dict)
    moments: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def required_bytes(self) -> int:
        """Device memory the run needs: the peak plus context and allocator margin."""
        return int(self.peak_bytes * (1 + RESERVE_FRACTION) + CUDA_CONTEXT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "setting": self.setting.name, "options": asdict(self.setting),
            "peak_gib": self.peak_gib, "required_gib": self.required_bytes() / GIB,
            "phase": self.phase, "parts_gib": {k: v / GIB for k, v in self.parts.items()},
            "moments_gib": {k: sum(v.values()) / GIB for k, v in self.moments.items()},
        }


def block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts as allocated for a fresh ``nbytes`` request."""
    if nbytes <= 0:
        return 0
    size = -(-nbytes // _ROUND) * _ROUND
    if size <= _SMALL_SIZE:
        return size
    segment = _LARGE_BUFFER if size < _MIN_LARGE_ALLOC else -(-size // _ROUND_LARGE) * _ROUND_LARGE
    return size if segment - size > _SMALL_SIZE else segment


def _exact(nbytes: int) -> int:
    return max(nbytes, 0)


def num_blocks(dim: int, block_size: int) -> tuple[int, int]:
    """``(num_blocks, block)`` of one side (``BlockLayout.for_dim``)."""
    block = min(block_size, dim)
    return -(-dim // block), block


def _tensors(rb: Round, sizes: list[int], count: int = 1) -> int:
    return count * sum(rb(s) for s in sizes)


def predict(
    shape: ModelShape,
    seq_len: int,
    batch_size: int,
    setting: Setting,
    preset: str = "",
    dtype_bytes: int = 2,
    cuda_allocator: bool = True,
) -> MemoryPlan:
    """Peak memory of a training step of ``shape`` on ``batch_size x seq_len`` tokens.

    ``dtype_bytes``: bytes per element of the model dtype (2 for bf16, 4 for float32).
    ``cuda_allocator=False`` counts tensors' own bytes (no allocator rounding, no cuBLAS
    workspace): what the tensors of a CPU run occupy.
    """
    rb: Round = block_bytes if cuda_allocator else _exact
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    e = dtype_bytes
    t = seq_len * batch_size
    d, vocab, n_layers = shape.hidden, shape.vocab, shape.layers
    poet = setting.optimizer == "poetx"
    linears = shape.linears()

    # ---- persistent tensors ------------------------------------------------------------------
    embed_sizes = [vocab * d] if shape.tie_embeddings else [vocab * d, vocab * d]
    norm_sizes = [d] * (2 * n_layers + 1)
    dense_param_elems = embed_sizes + norm_sizes
    persistent: dict[str, int] = dict.fromkeys(PARTS, 0)
    persistent["embed_head_norm_weights"] = _tensors(rb, [s * e for s in dense_param_elems])
    persistent["embed_head_norm_states"] = _dense_states(rb, setting, embed_sizes, norm_sizes, e)
    grads: dict[str, int] = {}
    grad_embed = _tensors(rb, [vocab * d * e])
    grads["embed_head_norm_grads"] = grad_embed * len(embed_sizes) + _tensors(
        rb, [d * e for _ in norm_sizes])

    if poet:
        w0_bytes, buffers = 0, 0
        low_precision_w0 = setting.w0_format != "auto" or e < 4
        for _, m, n in linears:
            if setting.w0_format == "auto":
                w0_bytes += rb(m * n * e)
            else:
                groups = -(-n // setting.quant_group_size)
                w0_bytes += rb(m * n) + rb(m * groups * 4)
            # perm_in/perm_out int64 and the int32 inverse output index cached by the kernels
            buffers += rb(8 * n) + rb(8 * m) + rb(4 * m)
        persistent["w0"] = w0_bytes * n_layers
        if setting.w0_residual == "device" and low_precision_w0:
            persistent["w0_residual"] = w0_bytes * n_layers  # same format and scales as W0
        persistent["buffers"] = buffers * n_layers
        theta = _layer_theta_bytes(rb, linears, setting.block_size)
        persistent["rotation_params"] = theta * n_layers
        persistent["rotation_states"] = n_layers * (
            2 * theta if setting.rotation_states == "fp32" else
            sum(_lowbit_states(rb, s, 4) for s in _layer_theta_sizes(linears, setting.block_size)))
        layer_grad = theta
        grads["rotation_grads"] = theta * n_layers
    else:
        weights = _tensors(rb, [m * n * e for _, m, n in linears])
        persistent["dense_linear_weights"] = weights * n_layers
        persistent["dense_linear_states"] = 2 * weights * n_layers
        layer_grad = weights
        grads["dense_linear_grads"] = weights * n_layers
    persistent["overhead"] = GEMM_THREADS * CUBLAS_WORKSPACE if cuda_allocator else 0
    grad_part = "rotation_grads" if poet else "dense_linear_grads"

    # ---- gradient accumulation: what the last micro-batch finds -------------------------------
    accum = setting.grad_accum > 1
    step_blocks: dict[str, int] = {}  # the step's rotation blocks and their gradient sum
    carried: dict[str, int] = {}  # gradients of the earlier micro-batches
    if accum:
        carried = {k: v for k, v in grads.items() if k != "rotation_grads"}
        if poet:
            calls = _build_calls(linears, setting.block_size,
                                 batched=cuda_allocator and setting.mode == "fast")
            step_blocks = {
                "accumulated_blocks": n_layers * sum(rb(e * _values(c)) + 2 * rb(4)
                                                     for c in calls),
                "block_grads": n_layers * sum(rb(4 * _values(c)) for c in calls),
            }

    # ---- activations -------------------------------------------------------------------------
    saved = saved_activations(shape, seq_len, batch_size, setting, e, cuda_allocator)
    saved_layer, kept_layer = saved["layer"], saved["kept_layer"]
    legacy_loss = setting.loss == "token-chunked"
    if legacy_loss:
        saved["loss_lse"] = 0
    all_saved = (n_layers * kept_layer + saved["rope"] + saved["final_norm"]
                 + saved["loss_count"] + saved["loss_lse"] + saved["loss_logits"])

    moments: list[tuple[str, dict[str, int]]] = []

    def moment(name: str, grad_bytes: dict[str, int], activations: int = 0, loss: int = 0,
               backward: int = 0, optimizer: int = 0) -> None:
        parts = dict(persistent)
        for k, v in grad_bytes.items():
            parts[k] += v
        if name != "optimizer-step":  # AccumulatedRotations is left before the step
            for k, v in step_blocks.items():
                parts[k] += v
        parts["activations"] += activations
        parts["loss_temporaries"] += loss
        parts["backward_temporaries"] += backward
        parts["optimizer_temporaries"] += optimizer
        moments.append((name, parts))

    loss_fwd, loss_bwd = _LOSS_TEMPORARIES[setting.loss](rb, t, d, vocab, e)
    # the forward's lse buffer (and kept logits) are allocated in the loss and saved for
    # backward
    fresh = saved["loss_lse"] + saved["loss_logits"]
    moment("loss-forward", carried, activations=all_saved - fresh, loss=loss_fwd + fresh)
    moment("loss-backward", carried, activations=all_saved, loss=loss_bwd)

    in_bwd = setting.step_in_backward
    head_grad = {"embed_head_norm_grads": (0 if in_bwd else grad_embed) + _tensors(rb, [d * e])}
    if accum:  # the head's gradient is added into the one the earlier micro-batches left
        head_grad = {"embed_head_norm_grads": grads["embed_head_norm_grads"]}
    grad_flow = 2 * rb(t * d * e)  # gradient into and out of the layer
    layer_work = _layer_backward_temporaries(rb, shape, t, setting, e)
    recompute = saved_layer if setting.checkpointing else 0
    for position, label in ((n_layers - 1, "last"), (0, "first")):
        done = n_layers - 1 - position
        g = dict(head_grad)
        if accum and not poet:
            # every linear's accumulated gradient, and the fresh one of the largest linear
            g[grad_part] = n_layers * layer_grad + max(rb(m * n * e) for _, m, n in linears)
        else:
            g[grad_part] = g.get(grad_part, 0) + (done + 1) * layer_grad
        # the final norm's and the loss's saved tensors are freed once their backward ran
        acts = (position + 1) * kept_layer + recompute + saved["rope"] + grad_flow
        moment(f"layer-backward ({label} layer)", g, activations=acts, backward=layer_work)
    if accum and poet:
        # the first layer's last build call: its linears' backward is done; every skew
        # gradient is written (this call's as the call writes them)
        g = dict(head_grad)
        g[grad_part] = n_layers * layer_grad
        moment("rotation-link (first layer)", g, activations=saved["rope"] + grad_flow,
               backward=_link_temporaries(rb, calls))

    # end of backward: the embedding's gradient is written while every other gradient is held
    # (the head's too unless it was stepped in backward)
    end = dict(grads)
    if accum:  # the fresh gradient of the embedding beside the accumulated one
        end["embed_head_norm_grads"] += grad_embed
    step_scratch = _step_temporaries(rb, setting, embed_sizes, norm_sizes, e)
    if in_bwd and not shape.tie_embeddings:
        end["embed_head_norm_grads"] -= grad_embed
    # in backward, the embedding's step follows its backward while every other gradient lives
    moment("embedding-backward", end, activations=rb(t * d * e),
           optimizer=step_scratch if in_bwd else 0)

    if in_bwd:
        grads = dict(grads)
        grads["embed_head_norm_grads"] -= grad_embed * len(embed_sizes)
    moment("optimizer-step", grads, optimizer=step_scratch)

    if setting.cuda_graphs:
        _, step_peak = max(moments, key=lambda item: sum(item[1].values()))
        # evaluation runs without a gradient: the loss recomputes its chunks, keeps nothing
        eval_loss = loss_fwd
        if setting.loss == "fused":
            eval_loss = (_fused_loss_temporaries(rb, t, d, vocab, e, keep=False)[0]
                         + saved["loss_lse"])
        outside = _outside_graph_temporaries(rb, shape, t, setting, e, saved, eval_loss)
        moment("outside the graph (merge / eval)", {},
               backward=sum(step_peak.values()) - sum(persistent.values()) + outside)

    phase, parts = max(moments, key=lambda item: sum(item[1].values()))
    return MemoryPlan(preset=preset, seq_len=seq_len, batch_size=batch_size, setting=setting,
                      peak_bytes=sum(parts.values()), phase=phase, parts=parts,
                      moments=dict(moments))


def saved_activations(shape: ModelShape, seq_len: int, batch_size: int, setting: Setting,
                      dtype_bytes: int = 2, cuda_allocator: bool = True) -> dict[str, int]:
    """Bytes kept for backward between forward and backward.

    Returns ``layer`` (one decoder layer's saved tensors, as recomputed under checkpointing),
    ``kept_layer`` (what each layer keeps until its backward: ``layer``, or only its input under
    checkpointing), ``rope`` (rotary ``cos``/``sin`` of one sequence, shared by the batch and
    the layers), ``final_norm`` (the final RMSNorm with its output, which the loss saves) and
    ``loss_count`` (the loss's token count, an int64 kept on the device so nothing syncs),
    ``loss_lse`` (each token's float32 log-sum-exp, kept by the loss for its backward) and
    ``loss_logits`` (the batch's logits in the model dtype, which the ``"fused"`` loss keeps
    where they fit ``KEEP_LOGITS_BYTES``).
    """
    rb: Round = block_bytes if cuda_allocator else _exact
    e, t, d = dtype_bytes, seq_len * batch_size, shape.hidden
    layer = _saved_layer_bytes(rb, shape, t, setting, e)
    kept = rb(t * d * e) if setting.checkpointing else layer
    kept_logits = setting.loss == "fused" and keeps_logits(t, shape.vocab, e)
    return {"layer": layer, "kept_layer": kept, "rope": 2 * rb(seq_len * shape.head_dim * e),
            "final_norm": _norm_saved(rb, t, d, e), "loss_count": rb(8), "loss_lse": rb(4 * t),
            "loss_logits": rb(t * shape.vocab * e) if kept_logits else 0}


def _layer_theta_sizes(linears: list[tuple[str, int, int]], block_size: int) -> list[int]:
    """Values of each skew-parameter tensor of one layer (input side, output side per linear)."""
    sizes = []
    for _, m, n in linears:
        for dim in (n, m):
            nb, b = num_blocks(dim, block_size)
            sizes.append(nb * b * (b - 1) // 2)
    return sizes


def _build_calls(linears: list[tuple[str, int, int]], block_size: int,
                 batched: bool) -> list[list[tuple[int, int]]]:
    """``(nb, b)`` of the sides built by each call of one layer's blocks
    (``poetx.layers.rotation_groups._calls``): the sides of a call share the block size, and
    a call holds at most one side with a padded last block, placed last. ``batched``: the
    decoder layer's linears are built together (fast mode on a GPU), else one linear at a
    time."""
    groups = [[(n, m) for _, m, n in linears]] if batched else [[(n, m)] for _, m, n in linears]
    calls = []
    for dims in groups:
        by_block: dict[int, tuple[list, list]] = {}
        for pair in dims:
            for dim in pair:
                nb, b = num_blocks(dim, block_size)
                by_block.setdefault(b, ([], []))[dim % b != 0].append((nb, b))
        for full, padded in by_block.values():
            calls += [full + padded[:1]] + [[p] for p in padded[1:]]
    return [c for c in calls if c]


def _values(call: list[tuple[int, int]]) -> int:
    return sum(nb * b * b for nb, b in call)


# poetx.ops.rotation_group.CHUNK_BLOCKS: blocks per Cayley-Neumann backward call, at most
LINK_CHUNK_BLOCKS = 96
# float32 (n, b, b) buffers of that backward besides its input (the kernels' scratch)
LINK_SCRATCH_BUFFERS = 6


def _link_temporaries(rb: Round, calls: list[list[tuple[int, int]]]) -> int:
    """Scratch of the last micro-batch's Cayley-Neumann backward of a build call on the summed
    block gradient (``rotation_group._Link``), largest call: per chunk of consecutive sides
    (``rotation_group._chunks``) the backward's buffers. Its input is a part of the call's
    gradient sink (``block_grads``); the skew gradients it writes are counted as gradients."""
    worst = 0
    for call in calls:
        chunks, first, total = [], 0, 0
        for i, (nb, _) in enumerate(call):
            if i > first and total + nb > LINK_CHUNK_BLOCKS:
                chunks.append(call[first:i])
                first, total = i, 0
            total += nb
        chunks.append(call[first:])
        for chunk in chunks:
            worst = max(worst, LINK_SCRATCH_BUFFERS * rb(4 * _values(chunk)))
    return worst


def _layer_theta_bytes(rb: Round, linears: list[tuple[str, int, int]], block_size: int) -> int:
    return sum(rb(4 * s) for s in _layer_theta_sizes(linears, block_size))


def _lowbit_states(rb: Round, numel: int, elem_bytes: int) -> int:
    """Both Adam states of one tensor under torchao's AdamW8bit (bytes)."""
    if numel >= LOWBIT_MIN and numel % LOWBIT_BLOCK == 0:
        return 2 * (rb(numel) + rb(4 * numel // LOWBIT_BLOCK) + rb(LOWBIT_QMAP_BYTES))
    return 2 * rb(elem_bytes * numel)


def _norm_saved(rb: Round, t: int, d: int, e: int, float32_copy: bool = True) -> int:
    """An eager RMSNorm saves its float32 input copy, the float32 ``rsqrt`` per token and its
    normalized value; its output is saved by whatever consumes it (counted here too, as every
    consumer shares that one tensor). Compiled (``float32_copy=False``), the backward recomputes
    the float32 copy from the input instead of keeping it."""
    return (rb(4 * t * d) if float32_copy else 0) + rb(4 * t) + 2 * rb(e * t * d)


def _saved_layer_bytes(rb: Round, shape: ModelShape, t: int, setting: Setting, e: int) -> int:
    """Bytes autograd keeps for one decoder layer between its forward and its backward."""
    d, i = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    total = 2 * _norm_saved(rb, t, d, e, float32_copy=not setting.blocks_compiled)
    # rotated q and k, v, attention output (saved by SDPA and o_proj), float32 log-sum-exp
    total += 2 * rb(e * t * q) + 2 * rb(e * t * kv) + rb(4 * t * shape.heads)
    # gate output, its SiLU, up output, their product (the input of down_proj, which POET-X's
    # down_proj may keep permuted, padded to whole blocks, instead)
    product = i
    poet = setting.optimizer == "poetx"
    fused = poet and setting.mlp_frames == "fused" and setting.mlp_permutations != "shared"
    if (poet and setting.permuted_saves in ("auto", "all")
            and setting.mlp_permutations != "shared"):
        product = math.prod(num_blocks(i, setting.block_size))
    if poet and setting.permuted_saves == "all":
        # every other linear keeps its input permuted, padded to whole blocks; the two norms'
        # outputs, which only q/k/v and gate/up kept, are no longer kept (the attention
        # output still is, by the attention)
        total += sum(rb(e * t * math.prod(num_blocks(n, setting.block_size)))
                     for name, _, n in shape.linears() if name != "down_proj")
        total -= 2 * rb(e * t * d)
    if fused:  # gate and up outputs (the frame-SwiGLU node), down's input as it comes
        total += 3 * rb(e * t * i)
    else:
        total += 3 * rb(e * t * i) + rb(e * t * product)
    if setting.optimizer == "poetx" and setting.mode == "fast":
        for _, m, n in shape.linears():
            total += rb(e * t * m)
            if setting.grad_accum > 1:
                continue  # the blocks saved are the step's (accumulated_blocks)
            for dim in (n, m):
                nb, b = num_blocks(dim, setting.block_size)
                total += rb(e * nb * b * b)
    return total


def _layer_backward_temporaries(rb: Round, shape: ModelShape, t: int, setting: Setting,
                                e: int) -> int:
    """Largest scratch of one linear's backward in a decoder layer (they run one at a time)."""
    worst = 0
    accum = setting.grad_accum > 1
    for _, m, n in shape.linears():
        if setting.optimizer != "poetx":
            worst = max(worst, rb(e * t * n))  # grad input; grad weight is counted
            continue
        nb_in, b_in = num_blocks(n, setting.block_size)
        nb_out, b_out = num_blocks(m, setting.block_size)
        blocks = 0 if setting.mode == "fast" or accum else (
            rb(e * nb_in * b_in * b_in) + rb(e * nb_out * b_out * b_out))
        # v (recomputed in mem mode; its input rotation u alongside), grad_v, grad_u, grad_x
        tokens = rb(e * t * n) * 3 + rb(e * t * m) * 2
        # block Gram gradient (float32) and the six float32 Cayley-Neumann backward buffers
        nb, b = max((nb_in, b_in), (nb_out, b_out), key=lambda x: x[0] * x[1] * x[1])
        cayley = 7 * rb(4 * nb * b * b)
        if accum:
            # the step's blocks, differentiated later on the sum (rotation-link): the Grams
            # write into the step's gradient sink (``block_grads``), nothing else is held
            cayley = 0
        weight = 0
        if setting.w0_format != "auto":
            # dequantize: float32 copy of the codes, float32 product, then the bf16 weight that
            # the backward holds; the float32 pair is gone before the token buffers appear
            weight = max(rb(4 * m * n) * 2 + rb(e * m * n) - tokens,
                         rb(e * m * n))
        worst = max(worst, blocks + tokens + cayley + weight)
    return worst


def _fused_loss_temporaries(rb: Round, t: int, d: int, vocab: int, e: int,
                            keep: bool | None = None) -> tuple[int, int]:
    """Peak scratch of ``chunked_cross_entropy`` in forward and in backward (bytes), beyond
    what it saves (``loss_lse``, ``loss_logits``). ``keep``: whether the logits are kept
    (``None``: as ``keeps_logits`` decides for a training step)."""
    if keep is None:
        keep = keeps_logits(t, vocab, e)
    # the sum: each token's (lse - picked), its validity, their product
    total = 2 * rb(4 * t) + rb(t)
    valid_and_weights = rb(t) + rb(4 * t)
    if keep:
        # forward: the target logits beside the kept logits; backward: the gradient is written
        # over the kept logits, then the head's and the hidden states' gradients
        return (rb(4 * t) + total,
                valid_and_weights + rb(vocab * d * e) + rb(t * d * e))
    c = auto_chunk_tokens(vocab)
    chunks = [min(c, t - s) for s in range(0, t, c)]
    fwd = rb(4 * t) + max(max(rb(r * vocab * e) for r in chunks), total)
    # backward, per chunk of the vocabulary: its logits (overwritten by their gradient); for
    # the whole backward the head gradient and the float32 hidden-gradient accumulator, which
    # is converted to the model dtype at the end
    vc = vocab_chunk(c, vocab, t)
    rows = [min(vc, vocab - s) for s in range(0, vocab, vc)]
    held = rb(vocab * d * e) + rb(t * d * 4) + valid_and_weights
    return fwd, held + max(max(rb(t * r * e) for r in rows), rb(t * d * e))


def _loss_temporaries(rb: Round, t: int, d: int, vocab: int, e: int) -> tuple[int, int]:
    """Peak scratch of the issue-13 loss (float32 copies of each chunk's logits) in forward
    and in backward (bytes)."""
    c = auto_chunk_tokens(vocab)
    chunks = [min(c, t - s) for s in range(0, t, c)]

    # forward, per chunk of tokens: the model-dtype logits and their float32 copy, then the
    # float32 copy and the exp(logits - max) of logsumexp
    fwd = max(max(rb(r * vocab * e) + rb(r * vocab * 4), 2 * rb(r * vocab * 4)) for r in chunks)
    # backward, per chunk of the vocabulary (rows of the head): logits in the model dtype, then
    # float32 probabilities, then their model-dtype copy; for the whole backward the head
    # gradient, the float32 hidden-gradient accumulator and per-token masks and weights; at
    # the end the accumulator is converted to the model dtype
    vc = vocab_chunk(c, vocab, t)
    rows = [min(vc, vocab - s) for s in range(0, vocab, vc)]
    per_chunk = max(rb(t * r * e) + rb(t * r * 4) for r in rows)
    masks = rb(t) + rb(4 * t) + rb(8 * t) + rb(t)  # valid, weights, local ids, inside
    held = rb(vocab * d * e) + rb(t * d * 4) + masks
    return fwd, held + max(per_chunk, rb(t * d * e))


def _token_chunked_loss_temporaries(rb: Round, t: int, d: int, vocab: int, e: int
                                    ) -> tuple[int, int]:
    """The loss before issue 13 (chunks of tokens in backward too, a float32 head gradient
    and its conversion): what the rows recorded with it used."""
    c = max(16, LOGITS_BUDGET // max(vocab, 1))  # its chunks were not yet whole GEMM tiles
    chunks = [min(c, t - s) for s in range(0, t, c)]

    def per(rows: int, nbytes: int) -> int:
        return rb(rows * vocab * nbytes)

    fwd = 0
    for k, rows in enumerate(chunks):
        prev = per(chunks[k - 1], 4) if k else 0
        fwd = max(fwd, prev + per(rows, e) + per(rows, 4), per(rows, 4) * 2)
    grad_w32 = rb(vocab * d * 4)
    grad_hidden = rb(t * d * e)
    loop = 0
    for k, rows in enumerate(chunks):
        prev = per(chunks[k - 1], 4) + per(chunks[k - 1], e) if k else 0
        loop = max(loop, prev + per(rows, e) + 2 * per(rows, 4),
                   per(rows, 4) * 2 + per(rows, e) + rb(rows * d * 4))
    convert = 0 if e == 4 else rb(vocab * d * e)
    last = chunks[-1]
    end = convert + per(last, 4) + per(last, e)
    return fwd, grad_w32 + grad_hidden + max(loop, end)


_LOSS_TEMPORARIES = {"fused": _fused_loss_temporaries, "vocab-chunked": _loss_temporaries,
                     "token-chunked": _token_chunked_loss_temporaries}


def _dense_states(rb: Round, setting: Setting, embed_sizes: list[int], norm_sizes: list[int],
                  e: int) -> int:
    """Optimizer state of embedding, lm_head and norms (bytes)."""
    sizes = embed_sizes + norm_sizes
    plain = 2 * _tensors(rb, [s * e for s in sizes])
    if setting.dense_optimizer == "adamw":
        return plain
    if setting.dense_optimizer == "adamw-kahan":
        return plain + _tensors(rb, [s * e for s in sizes])
    if setting.dense_optimizer == "adamw-fp32-master":
        return plain + _tensors(rb, [s * 4 for s in sizes])
    # torchao AdamW8bit for the matrices; norms keep Kahan-compensated states in their dtype
    return (sum(_lowbit_states(rb, s, e) for s in embed_sizes)
            + 3 * _tensors(rb, [s * e for s in norm_sizes]))


# Values updated at once by the compensated AdamW (poetx.optim.dense_update.DEFAULT_CHUNK),
# which holds at most five float32 slices of that size.
COMPENSATED_CHUNK = 1 << 22
COMPENSATED_SCRATCH_SLICES = 5


def _step_temporaries(rb: Round, setting: Setting, embed_sizes: list[int],
                      norm_sizes: list[int], e: int) -> int:
    """Scratch of the optimizer step beyond states and gradients (bytes)."""
    if setting.dense_optimizer in ("adamw-kahan", "adamw-fp32-master"):
        chunk = min(COMPENSATED_CHUNK, max(embed_sizes))
        return COMPENSATED_SCRATCH_SLICES * rb(4 * chunk)
    if setting.dense_optimizer == "adamw8bit":  # Kahan for the norms, then 8-bit slices
        kahan = COMPENSATED_SCRATCH_SLICES * rb(4 * min(COMPENSATED_CHUNK, max(norm_sizes)))
        lowbit = LOWBIT_SCRATCH_SLICES * rb(4 * min(LOWBIT_CHUNK, max(embed_sizes)))
        return max(kahan, lowbit)
    return 0


def _outside_graph_temporaries(rb: Round, shape: ModelShape, t: int, setting: Setting, e: int,
                               saved: dict[str, int], loss_fwd: int) -> int:
    """What runs outside a captured step allocates beside the graph's pool (bytes): the
    merge of the largest linear (its float32 product ``R W0 P``, one float32 temporary and the
    residual brought to the device) or one evaluation forward (a layer's activations and the
    loss forward), whichever is larger. Not measured yet."""
    merge = 0
    if setting.optimizer == "poetx":
        m, n = max(((m, n) for _, m, n in shape.linears()), key=lambda x: x[0] * x[1])
        w0 = rb(m * n * e) if setting.w0_format == "auto" else rb(m * n)
        merge = 2 * rb(4 * m * n) + (w0 if setting.w0_residual == "host" else 0)
    evaluation = saved["layer"] + loss_fwd
    return max(merge, evaluation)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}; got {value!r}")


def shape_of(preset: str, vocab_size: int | None = None) -> ModelShape:
    """The :class:`ModelShape` of a preset (``vocab_size`` overrides the preset's)."""
    from poetx.model.presets import get_shape

    s = get_shape(preset)
    vocab = s.vocab if vocab_size is None else vocab_size
    return ModelShape(s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, vocab,
                      s.tie_embeddings)


def plan(preset: str, seq_len: int, batch_size: int, setting: Setting,
         vocab_size: int | None = None, dtype_bytes: int = 2) -> MemoryPlan:
    """:func:`predict` for a preset name."""
    return predict(shape_of(preset, vocab_size), seq_len, batch_size, setting, preset,
                   dtype_bytes)


def standard_settings(block_sizes: tuple[int, ...] = (256,)) -> list[Setting]:
    """The settings ``poetx plan`` compares: AdamW with and without checkpointing; POET-X fast /
    mem, with and without checkpointing, bf16 / int8 / fp8 ``W0`` at each block size; and mem
    with checkpointing (bf16 and int8 ``W0``) with each dense-parameter optimizer, then with
    8-bit embedding/head states stepped in backward, then with 8-bit rotation states too."""
    out = [Setting(optimizer="adamw"), Setting(optimizer="adamw", checkpointing=True)]
    for b in block_sizes:
        for mode in MODES:
            for ckpt in (False, True):
                out.append(Setting(mode=mode, checkpointing=ckpt, block_size=b))
        for fmt in ("int8", "fp8"):
            out.append(Setting(mode="mem", checkpointing=True, w0_format=fmt, block_size=b))
    for fmt in ("auto", "int8"):
        lean = Setting(mode="mem", checkpointing=True, w0_format=fmt, block_size=block_sizes[0])
        out += [replace(lean, dense_optimizer=o) for o in DENSE_OPTIMIZERS if o != "adamw"]
        out.append(replace(lean, dense_optimizer="adamw8bit", step_in_backward=True))
        out.append(replace(lean, dense_optimizer="adamw8bit", step_in_backward=True,
                           rotation_states="8bit"))
    return out

