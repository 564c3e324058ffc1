"""The Trainer's step on CPU: no host sync, a device-side skip of non-finite steps, learning
rates as tensors updated in place, gradient accumulation, each rank's rows of a global batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import poetx.train.trainer as trainer_mod
from poetx.data.packing import PackedBatches, validation_batches
from poetx.train.config import TrainConfig
from poetx.train.parallel import DistContext
from poetx.train.run_model import build_run_model
from poetx.train.trainer import Trainer

VOCAB = 64
SEQ = 16


def _data(global_batch: int) -> SimpleNamespace:
    tokens = np.random.RandomState(0).randint(0, VOCAB, size=40_000).astype(np.uint16)
    return SimpleNamespace(
        train=PackedBatches(tokens[:36_000], SEQ, global_batch, seed=3),
        val=validation_batches(tokens[36_000:], SEQ, global_batch, 2),
        description="random tokens", train_tokens=36_000, val_tokens=4_000, vocab_size=VOCAB)


def _trainer(batch_size: int = 4, grad_accum: int = 1, ctx: DistContext | None = None,
             dtype: torch.dtype = torch.float32, **kw) -> Trainer:
    ctx = ctx or DistContext()
    settings = dict(preset="tiny", vocab_size=VOCAB, seq_len=SEQ, batch_size=batch_size,
                    grad_accum=grad_accum, steps=10, progress=False, tensorboard=False,
                    poet={"merge_every": 3})
    settings.update(kw)
    cfg = TrainConfig(**settings)
    torch.manual_seed(cfg.seed)
    model = build_run_model(cfg, VOCAB, torch.device("cpu"), dtype)
    return Trainer(cfg, model, _data(batch_size * grad_accum * ctx.world), torch.device("cpu"),
                   ctx)


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(t.params)}
    for i, p in enumerate(t.params):
        for key, value in t.optimizer.state.get(p, {}).items():
            out[f"s{i}.{key}"] = value.detach().clone()
    return out


class _NoHostSync(TorchDispatchMode):
    """Fails on the ops that make the host wait for the device: reading a value
    (``.item()``, ``float()``, ``bool()`` all end in ``_local_scalar_dense``) and ops whose
    output size depends on values (boolean indexing)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            raise AssertionError(f"host sync inside train_step: aten.{func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer,in_backward", [("poetx", False), ("adamw", False),
                                                   ("poetx", True)])
def test_train_step_never_waits_for_the_device(optimizer, in_backward, monkeypatch):
    # transformers' mask builder reads position_ids once per forward to detect packed
    # sequences (an eager-only check it skips under CUDA-graph capture and torch.compile);
    # our rows are never packed, so give its answer for that case and test the rest.
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    # the optimizer step in backward (embedding and lm_head) is recorded by a captured step too
    t = (_trainer(optimizer=optimizer, step_in_backward=True) if in_backward else
         _trainer(optimizer=optimizer, grad_accum=2, batch_size=2))
    assert (t.in_backward is not None) == in_backward
    batch = t.load_batch(0)
    t.step_fn(batch)  # the first step creates the optimizer state
    with _NoHostSync():
        metrics = t.step_fn(t.load_batch(1))
    assert set(metrics) == {"loss", "grad_norm", "nonfinite"}
    assert all(v.dim() == 0 for v in metrics.values())
    assert math.isfinite(float(metrics["loss"])) and not bool(metrics["nonfinite"])


@pytest.mark.parametrize("in_backward", [False, True])
def test_nonfinite_step_is_skipped_on_device_without_touching_state(in_backward, monkeypatch):
    t = _trainer(step_in_backward=in_backward)
    t.step_fn(t.load_batch(0))
    before = _state(t)
    assert any(k.endswith(".step") for k in before)
    real = trainer_mod.compute_loss
    monkeypatch.setattr(trainer_mod, "compute_loss", lambda m, b: real(m, b) * float("nan"))
    metrics = t.step_fn(t.load_batch(1))
    assert bool(metrics["nonfinite"]) and math.isnan(float(metrics["loss"]))
    after = _state(t)
    for key, value in before.items():  # parameters, exp_avg(_sq) and the step count alike
        assert torch.equal(after[key], value), key
    monkeypatch.setattr(trainer_mod, "compute_loss", real)
    metrics = t.step_fn(t.load_batch(1))
    assert not bool(metrics["nonfinite"])
    moved = _state(t)
    assert not torch.equal(moved["p0"], before["p0"])
    step_keys = [k for k in before if k.endswith(".step")]
    assert all(int(moved[k]) == int(before[k]) + 1 for k in step_keys)


def test_learning_rates_are_device_tensors_updated_in_place():
    t = _trainer(optimizer="adamw", warmup_steps=4)
    tensors = [g["lr"] for g in t.optimizer.param_groups]
    assert all(torch.is_tensor(x) for x in tensors)
    for _ in range(3):
        expected = t.lr_of("decay")
        assert float(t.optimizer.param_groups[1]["lr"]) == pytest.approx(expected, rel=1e-6)
        t.step_fn(t.load_batch(0))
        t._advance_schedules(1)
    assert [g["lr"] for g in t.optimizer.param_groups] == tensors  # same objects
    assert all(a is b for a, b in zip(tensors, (g["lr"] for g in t.optimizer.param_groups),
                                       strict=True))
    assert t.lr_of("decay") == pytest.approx(t.cfg.lr * 4 / 4)


def test_grad_accum_equals_the_larger_batch():
    one, two = _trainer(batch_size=4), _trainer(batch_size=2, grad_accum=2)
    assert torch.equal(one.load_batch(0).flatten(0, 1), two.load_batch(0).flatten(0, 1))
    # Same parameters, same 4 rows: the gradients agree to float32 rounding (the loss runs
    # its logits in float32 whatever the model's dtype).
    one.step_fn(one.load_batch(0))
    two.step_fn(two.load_batch(0))
    for a, b in zip(one.params, two.params, strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * float(a.grad.abs().max()))
    one._advance_schedules(1)
    two._advance_schedules(1)
    for step in range(1, 5):  # a merge after step 3
        m1, m2 = one.step_fn(one.load_batch(step)), two.step_fn(two.load_batch(step))
        torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-5, atol=0)
        one._advance_schedules(step + 1)
        two._advance_schedules(step + 1)
    # (Parameters are not compared entry by entry: Adam's first steps after a merge are about
    # lr x sign(gradient), so an entry whose gradient is near zero flips with its rounding.)
    assert one.merge.merges == two.merge.merges == 1


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (4, 1)])
def test_ranks_take_contiguous_shares_of_one_global_batch(world, accum):
    whole = _trainer(batch_size=4)
    per_rank = 4 // (world * accum)
    shares = [_trainer(batch_size=per_rank, grad_accum=accum,
                       ctx=DistContext(rank=r, world=world)).load_batch(5).clone()
              for r in range(world)]
    joined = torch.cat([s.flatten(0, 1) for s in shares])
    torch.testing.assert_close(joined, whole.load_batch(5).flatten(0, 1), rtol=0, atol=0)


# CUDA: the same properties where they matter (skipped without a GPU) -------------------------
def _cuda_trainer(**kw) -> Trainer:
    settings = dict(preset="tiny", vocab_size=VOCAB, seq_len=SEQ, batch_size=4, steps=10,
                    progress=False, tensorboard=False, poet={"merge_every": 3})
    settings.update(kw)
    cfg = TrainConfig(**settings)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda")
    model = build_run_model(cfg, VOCAB, device, torch.bfloat16)
    return Trainer(cfg, model, _data(cfg.batch_size * cfg.grad_accum), device)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["poetx", "adamw"])
def test_cuda_train_step_runs_under_sync_debug_error(optimizer, monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    t = _cuda_trainer(optimizer=optimizer, grad_accum=2, batch_size=2)
    assert t.optimizer.defaults["fused"] and all(g["lr"].is_cuda for g in
                                                 t.optimizer.param_groups)
    t.step_fn(t.load_batch(0))
    batch = t.load_batch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = t.step_fn(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["loss"].is_cuda and not bool(metrics["nonfinite"])


@pytest.mark.gpu
def test_cuda_nonfinite_step_is_skipped_on_device(monkeypatch):
    t = _cuda_trainer()
    t.step_fn(t.load_batch(0))
    before = _state(t)
    real = trainer_mod.compute_loss
    monkeypatch.setattr(trainer_mod, "compute_loss", lambda m, b: real(m, b) * float("nan"))
    assert bool(t.step_fn(t.load_batch(1))["nonfinite"])
    after = _state(t)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_cuda_graphs_setting_falls_back_to_eager_off_cuda():
    t = _trainer()
    assert t.cfg.cuda_graphs and not t.graphs and t.captured is None
    assert t.step_fn == t.train_step
    assert t.describe_step() == "eager" and t.compiled_blocks == 0


def _eager_and_replayed_losses(steps: int = 10, **kw) -> tuple[list[float], list[float]]:
    """Losses of ``steps`` eager steps and of as many captured ones (replayed from the 4th),
    two Trainers of ``_cuda_trainer(**kw)`` from the same seed."""
    losses = {}
    kw.setdefault("compile_blocks", False)  # compiled blocks round differently: their own test
    for graphs in (False, True):
        t = _cuda_trainer(cuda_graphs=graphs, **kw)
        assert t.graphs == graphs
        run = []
        for step in range(steps):
            metrics = t.step_fn(t.load_batch(step))
            run.append(float(metrics["loss"]))
            t._advance_schedules(step + 1)
        assert (t.captured is not None and t.captured.captured) == graphs
        losses[graphs] = run
    return losses[False], losses[True]


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graph_step_matches_the_eager_step(accum):
    """The replayed step against the eager one, two runs from the same seed: the three eager
    warm-up steps are bitwise equal, the first replay (from a bitwise-equal state) agrees to
    ~1e-6 relative (cuBLAS picks its kernels differently under capture), and the following
    steps, through a merge at step 6, stay within bf16 noise of each other. With
    accumulation the graph holds the step's one rotation build and its one backward."""
    eager, replayed = _eager_and_replayed_losses(poet={"merge_every": 6},
                                                 batch_size=4 // accum, grad_accum=accum)
    assert replayed[:3] == eager[:3]
    assert abs(replayed[3] - eager[3]) <= 1e-4 * abs(eager[3])
    assert max(abs(r - e) / abs(e) for r, e in zip(replayed, eager, strict=True)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("w0_format", ["auto", "int8"])
def test_cuda_graph_step_with_grad_checkpointing_matches_the_eager_step(w0_format):
    """Checkpointed blocks recompute their forward inside the captured backward (the setting of
    the largest-model run, bench/largest.py): the replay follows the eager run through a merge
    at step 6 as closely as without checkpointing."""
    eager, replayed = _eager_and_replayed_losses(
        grad_checkpointing=True, poet={"merge_every": 6, "w0_format": w0_format})
    # the default CUDA generator still works outside the graph (model init, dropout)
    torch.randn(4, device="cuda")
    assert replayed[:3] == eager[:3]
    assert max(abs(r - e) / abs(e) for r, e in zip(replayed, eager, strict=True)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_blocks_follow_the_uncompiled_captured_run(grad_checkpointing):
    """``compile_blocks`` (the default of a captured step): the decoder blocks compiled around
    their POET layers train as the uncompiled blocks do, through a merge at step 6, to bf16
    noise (inductor fuses the float32 RMSNorm and SwiGLU, which rounds differently). Under
    checkpointing the Trainer leaves them uncompiled."""
    from poetx.model.compile_blocks import compiled_blocks

    losses = {}
    for compiled in (False, True):
        t = _cuda_trainer(compile_blocks=compiled, grad_checkpointing=grad_checkpointing,
                          poet={"merge_every": 6})
        # checkpointed blocks stay eager (torch.utils.checkpoint disables dynamo)
        compiles = compiled and not grad_checkpointing
        assert compiled_blocks(t.model) == (len(t.model.model.layers) if compiles else 0)
        assert ("decoder blocks compiled" in t.describe_step()) == compiles
        run = []
        for step in range(10):
            run.append(float(t.step_fn(t.load_batch(step))["loss"]))
            t._advance_schedules(step + 1)
        assert t.captured.captured
        losses[compiled] = run
    assert max(abs(c - e) / abs(e) for c, e in zip(losses[True], losses[False],
                                                    strict=True)) < 1e-2


@pytest.mark.gpu
def test_cuda_graph_step_with_step_in_backward_matches_the_eager_step():
    """The optimizer step in backward (post-accumulate-grad hooks on embedding and lm_head) is
    recorded with the rest of the captured step: a replay updates them as the eager step."""
    losses, heads = {}, {}
    for graphs in (False, True):
        t = _cuda_trainer(cuda_graphs=graphs, step_in_backward=True, compile_blocks=False)
        assert t.graphs == graphs and t.in_backward is not None
        head = t.model.get_output_embeddings().weight
        run = []
        for step in range(6):
            metrics = t.step_fn(t.load_batch(step))
            run.append(float(metrics["loss"]))
            assert head.grad is None  # stepped and freed inside backward
            t._advance_schedules(step + 1)
        assert (t.captured is not None and t.captured.captured) == graphs
        losses[graphs], heads[graphs] = run, head.detach().float().clone()
    eager, replayed = losses[False], losses[True]
    assert replayed[:3] == eager[:3]
    assert max(abs(r - e) / abs(e) for r, e in zip(replayed, eager, strict=True)) < 1e-2
    torch.testing.assert_close(heads[True], heads[False], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_grad_accum_builds_the_rotations_once_per_step(accum, built_blocks):
    """Whatever the accumulation, one step builds every rotation block once and runs its
    Cayley-Neumann backward once (the skew parameters change only in the optimizer step)."""
    t = _trainer(batch_size=4 // accum, grad_accum=accum)
    blocks = sum(layer.layout_in.num_blocks + layer.layout_out.num_blocks
                 for layer in t.poet_layers)
    assert blocks > 0
    for step in range(2):
        built_blocks.update(forward=0, backward=0)
        t.step_fn(t.load_batch(step))
        assert built_blocks == {"forward": blocks, "backward": blocks}
        assert all(layer.theta_in.grad is not None for layer in t.poet_layers)
        t._advance_schedules(step + 1)


@pytest.mark.gpu
def test_exact_cayley_runs_step_eagerly_on_cuda():
    """``--neumann-terms exact`` on CUDA: the step is not captured (cuSOLVER's batched LU at
    256-blocks cannot be, which failed the 60M exact-Cayley run of the quality study), and it
    trains: finite, falling losses."""
    t = _cuda_trainer(poet={"merge_every": 3, "neumann_terms": None}, compile_blocks=True)
    assert t.cfg.cuda_graphs and not t.graphs and t.captured is None
    assert t.compiled_blocks == 0 and "exact Cayley" in t.describe_step()
    losses = []
    for step in range(6):
        losses.append(float(t.step_fn(t.load_batch(step % 2))["loss"]))
        t._advance_schedules(step + 1)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
