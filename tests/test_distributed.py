"""POET-X under DistributedDataParallel (gloo on CPU): ranks stay identical through merges and
match one process that sees the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import poetx

STEPS = 4
CFG = poetx.POETConfig(block_size=8, merge_every=2, seed=11)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 20)).double()
    return poetx.wrap(model, CFG)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 24, generator=gen, dtype=torch.float64), torch.randn(
        8, 20, generator=gen, dtype=torch.float64
    )


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = poetx.make_optimizer(model, lr=1e-2, poet_lr=1e-2, fused=False)
    sched = poetx.MergeSchedule(model, opt, CFG)
    for _ in range(STEPS):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _data()
    shard = slice(rank * 4, rank * 4 + 4)
    _train(ddp, x[shard], y[shard])
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_agree_and_match_single_process(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    states = [torch.load(f"{out}.{r}") for r in range(2)]
    single = _model()
    _train(single, *_data())
    assert int(states[0]["0.merge_count"]) == STEPS // CFG.merge_every
    for key, value in single.state_dict().items():
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], value, rtol=1e-9, atol=1e-12, msg=key)


# poetx train under torchrun-style data parallelism ------------------------------------------
# Workers see what torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*) and call train().
STEPS_DP = 20
MERGE_DP = 8  # merges after steps 8 and 16


def _settings(corpus: dict[str, str], out, batch_size: int, **kw) -> dict:
    settings = dict(corpus, vocab_size=512, seq_len=32, batch_size=batch_size, steps=STEPS_DP,
                    eval_every=10, save_every=10, eval_batches=2, keep_last=10, progress=False,
                    tensorboard=False, device="cpu", out=str(out), poet={"merge_every": MERGE_DP})
    settings.update(kw)
    return settings


def _train_worker(rank: int, world: int, port: int, settings: dict, resume: bool,
                  dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _dump_final_state(f"{dump}.{rank}")
    _run(settings, resume)


def _dump_final_state(path: str) -> None:
    """Make Trainer.fit save the model's final state dict to ``path`` (W0, permutations...;
    sharded tensors gathered whole, every rank taking part)."""
    from torch.distributed.tensor import DTensor

    from poetx.train.trainer import Trainer

    real_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        result = real_fit(self, *args, **kwargs)
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                 for k, v in self.model.state_dict().items()}
        torch.save(state, path)
        return result

    Trainer.fit = fit


def _run(settings: dict, resume: bool) -> None:
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train
    from poetx.train.run_dir import config_from_sources

    if resume:
        cfg, ckpt = config_from_sources(None, settings, resume=True)
        train(cfg, ckpt)
    else:
        train(TrainConfig(**settings))


def _spawn(settings: dict, dump: str, resume: bool = False, world: int = 2) -> None:
    mp.spawn(_train_worker, args=(world, _free_port(), settings, resume, dump), nprocs=world,
             join=True)


def _losses(run_dir) -> list[float]:
    from poetx.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if r["type"] == "train"]


def _evals(run_dir) -> list[float]:
    from poetx.train.metrics import read_metrics

    return [r["val_loss"] for r in read_metrics(run_dir) if r["type"] == "eval"]


@pytest.fixture(scope="module")
def dp_corpus(tmp_path_factory) -> dict[str, str]:
    from tests.test_train import write_corpus

    root = tmp_path_factory.mktemp("dp-data")
    return {"data": str(write_corpus(root / "corpus.txt")), "cache_dir": str(root / "cache")}


@pytest.fixture(scope="module")
def reference(dp_corpus, tmp_path_factory):
    """One process, batch 4: the run every data-parallel variant must reproduce."""
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train

    out = tmp_path_factory.mktemp("ref") / "run"
    train(TrainConfig(**_settings(dp_corpus, out, batch_size=4)))
    return out


def _two_process_run(corpus, root, **settings_kw):
    """Two processes, 2 micro-batches of 1 each, batched rotation builds: the run dir and each
    rank's final state."""
    out = root / "run"
    settings = _settings(corpus, out, batch_size=1, grad_accum=2, **settings_kw)
    settings["poet"] = {**settings["poet"], "batch_rotations": "on"}
    _spawn(settings, str(root / "state"))
    return out, [torch.load(root / f"state.{r}") for r in range(2)]


def _assert_losses_and_evals_match(out, reference) -> None:
    losses, ref = _losses(out), _losses(reference)
    assert len(losses) == STEPS_DP
    # measured: at most 1.9e-6 apart (summation order of the all-reduce and accumulation)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_evals(out)), torch.tensor(_evals(reference)),
                               rtol=2e-5, atol=0)


@pytest.fixture(scope="module")
def ddp_run(dp_corpus, tmp_path_factory):
    """Two processes, each 2 micro-batches of 1 (global batch 4, as the reference): ddp and
    accumulation together (gradients accumulate locally, one all-reduce after the last
    micro-batch), rotation blocks built per decoder block (``batch_rotations="on"``; the
    reference builds them layer by layer: the skew gradients must reach the all-reduce the
    same). Returns the run dir and each rank's final state."""
    return _two_process_run(dp_corpus, tmp_path_factory.mktemp("ddp"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_train_matches_one_process_and_ranks_agree(reference, ddp_run):
    out, states = ddp_run
    _assert_losses_and_evals_match(out, reference)
    merges = {k: int(v) for k, v in states[0].items() if k.endswith("merge_count")}
    assert merges and set(merges.values()) == {STEPS_DP // MERGE_DP}
    for key, value in states[0].items():  # W0, permutations and trained parameters alike
        assert torch.equal(value, states[1][key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["derived"] == {"world_size": 2, "global_batch": 4, "parallel": "ddp",
                                 "tokens_per_step": 4 * 32}
    assert (config["batch_size"], config["grad_accum"]) == (1, 2)


def _continued(run_dir, root):
    """A copy of ``run_dir`` without its step-20 checkpoint (it continues from step 10)."""
    shutil.copytree(run_dir, root)
    shutil.rmtree(root / "checkpoints" / "step_00000020")
    return root


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_resume_moves_between_world_sizes_with_the_same_data_order(reference, ddp_run,
                                                                   tmp_path):
    # Two processes to step 10, then one process (batch 4 = 1 x 2 x 2) to the end.
    two_then_one = _continued(ddp_run[0], tmp_path / "two-then-one")
    _run({"out": str(two_then_one), "batch_size": 4, "grad_accum": 1}, resume=True)
    # One process to step 10, then two processes (batch 2 each).
    one_then_two = _continued(reference, tmp_path / "one-then-two")
    _spawn({"out": str(one_then_two), "batch_size": 2}, str(tmp_path / "b"), resume=True)
    ref = torch.tensor(_losses(reference))
    for run in (two_then_one, one_then_two):
        losses = _losses(run)
        assert len(losses) == STEPS_DP
        torch.testing.assert_close(torch.tensor(losses), ref, rtol=2e-5, atol=0)


def test_resume_refuses_another_global_batch(reference, tmp_path):
    from poetx.train.errors import TrainError

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    with pytest.raises(TrainError, match="global batch of 4"):
        _run({"out": str(run), "batch_size": 2, "steps": STEPS_DP + 1}, resume=True)


def _disagree_worker(rank: int, world: int, port: int, out: str) -> None:
    from poetx.train.parallel import DistContext, RankDisagreement, check_ranks_agree

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank, world)
    model = _model()
    check_ranks_agree(model, ctx, 0)  # same seeds: no complaint
    if rank == 1:
        with torch.no_grad():
            model[0].w0[0, 0] += 1e-12
    try:
        check_ranks_agree(model, ctx, 7)
        message = "no error"
    except RankDisagreement as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_rank_disagreement_after_a_merge_fails_loudly(tmp_path):
    out = str(tmp_path / "msg")
    mp.spawn(_disagree_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for r in range(2):
        message = Path(f"{out}.{r}").read_text()
        assert "step 7" in message and "rank(s) [1]" in message, message


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_torchrun_runs_poetx_train(dp_corpus, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "poetx.cli.main", "train",
           "--data", dp_corpus["data"], "--cache-dir", dp_corpus["cache_dir"],
           "--vocab-size", "512", "--seq-len", "32", "--batch-size", "1", "--grad-accum", "2",
           "--steps", "3", "--eval-batches", "1", "--device", "cpu", "--no-progress",
           "--no-tensorboard", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4 = batch 1 x grad accum 2 x 2 processes" in done.stdout
    assert done.stdout.count("poetx train:") == 1  # rank 0 alone prints
    assert len(_losses(out)) == 3


# FSDP2 (fully_shard) on CPU with gloo ------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_run(dp_corpus, tmp_path_factory):
    """Two processes sharding the model with FSDP2, global batch 4 as the reference (1 x 2
    micro-batches each), batched rotation builds. Returns the run dir and each rank's final
    state."""
    # As on CUDA: the rotation blocks of a decoder block built in one call, inside the one
    # FSDP2 group that holds the block's POET layers.
    return _two_process_run(dp_corpus, tmp_path_factory.mktemp("fsdp"), parallel="fsdp")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_fsdp_train_matches_one_process(reference, fsdp_run):
    out, states = fsdp_run
    _assert_losses_and_evals_match(out, reference)
    config = json.loads((out / "config.json").read_text())
    assert config["derived"]["parallel"] == "fsdp"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_fsdp_checkpoints_are_sharded_and_load_whole(fsdp_run, tmp_path):
    """Each rank wrote its own shard (torch.distributed.checkpoint), the manifest lists every
    file; one process without a process group reads the whole final state exactly, and
    ``poetx export`` writes a plain Hugging Face folder from it."""
    from transformers import AutoModelForCausalLM

    from poetx.cli.export import export_run
    from poetx.train.saved_run import load_run

    out, states = fsdp_run
    ckpt = out / "checkpoints" / "step_00000020"
    assert not (ckpt / "model.safetensors").exists()
    assert not (ckpt / "optimizer.safetensors").exists()
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["layout"] == "sharded"
    assert {f"sharded/{n}" for n in shards} <= set(manifest["files"])
    run = load_run(out)
    loaded = run.model.state_dict()
    assert loaded.keys() == states[0].keys()
    for key, value in states[0].items():
        assert torch.equal(loaded[key], value), key
    dest = export_run(out, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(dest).eval()
    ids = torch.randint(0, run.model.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, run.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_fsdp_checkpoints_resume_on_another_world_and_scheme(reference, fsdp_run, tmp_path):
    # The sharded checkpoint of step 10 continued by two sharded processes (the same run,
    # picked up), and by one process; the one-process checkpoint continued by two sharded
    # processes.
    fsdp_again = _continued(fsdp_run[0], tmp_path / "fsdp-again")
    _spawn({"out": str(fsdp_again), "batch_size": 1, "grad_accum": 2, "parallel": "fsdp"},
           str(tmp_path / "a"), resume=True)
    assert _losses(fsdp_again) == _losses(fsdp_run[0])  # the uninterrupted run's, exactly
    fsdp_then_one = _continued(fsdp_run[0], tmp_path / "fsdp-then-one")
    _run({"out": str(fsdp_then_one), "batch_size": 4, "grad_accum": 1}, resume=True)
    one_then_fsdp = _continued(reference, tmp_path / "one-then-fsdp")
    _spawn({"out": str(one_then_fsdp), "batch_size": 2, "parallel": "fsdp"},
           str(tmp_path / "b"), resume=True)
    ref = torch.tensor(_losses(reference))
    for run in (fsdp_then_one, one_then_fsdp):
        losses = _losses(run)
        assert len(losses) == STEPS_DP
        torch.testing.assert_close(torch.tensor(losses), ref, rtol=2e-5, atol=0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_shard_is_named(fsdp_run, tmp_path, damage):
    from poetx.train.checkpoint import CheckpointError

    run = _continued(fsdp_run[0], tmp_path / "run")
    shard = run / "checkpoints" / "step_00000010" / "sharded" / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is " + (
            "missing" if damage == "missing" else "corrupt")):
        _run({"out": str(run), "batch_size": 4, "grad_accum": 1}, resume=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_fsdp_int8_w0_matches_one_process(dp_corpus, tmp_path):
    # int8 W0 + float32 scales + float32 skew parameters in one sharded group (mixed dtypes
    # in the all-gather), merges every 4 steps, the same run in one process.
    poet = {"merge_every": 4, "w0_format": "int8"}
    one, two = tmp_path / "one", tmp_path / "two"
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train

    train(TrainConfig(**_settings(dp_corpus, one, batch_size=4, steps=8, poet=poet)))
    _spawn(_settings(dp_corpus, two, batch_size=2, steps=8, poet=poet, parallel="fsdp"),
           str(tmp_path / "state"))
    losses, ref = _losses(two), _losses(one)
    assert len(losses) == 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_fused_mlp_frames_data_parallel_match_one_process(dp_corpus, tmp_path, parallel):
    # The MLPs hand activations over in their layers' own orders; the frame maps must follow
    # the merges (every 4 steps) on every rank, sharded or replicated.
    poet = {"merge_every": 4, "mlp_frames": "fused"}
    one, two = tmp_path / "one", tmp_path / "two"
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train

    train(TrainConfig(**_settings(dp_corpus, one, batch_size=4, steps=8, poet=poet)))
    _spawn(_settings(dp_corpus, two, batch_size=2, steps=8, poet=poet, parallel=parallel),
           str(tmp_path / "state"))
    losses, ref = _losses(two), _losses(one)
    assert len(losses) == 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=2e-5, atol=0)


def test_parallel_auto_takes_fsdp_only_when_a_replica_does_not_fit():
    from poetx.train.parallel import DistContext, resolve_parallel

    one, two = DistContext(), DistContext(rank=0, world=2)
    assert resolve_parallel("auto", one, fits_replicated=False) == "none"
    assert resolve_parallel("auto", two, fits_replicated=True) == "ddp"
    assert resolve_parallel("auto", two, fits_replicated=None) == "ddp"  # unknown (CPU)
    assert resolve_parallel("auto", two, fits_replicated=False) == "fsdp"
    assert resolve_parallel("fsdp", two, fits_replicated=True) == "fsdp"
    with pytest.raises(ValueError, match="unsynchronized"):
        resolve_parallel("none", two)


def test_fits_replicated_follows_the_planner(monkeypatch):
    from types import SimpleNamespace

    import poetx.plan.fit as fit
    from poetx.plan.memory import plan

    cfg = SimpleNamespace(preset="llama-8b", seq_len=1024, batch_size=1, vocab_size=None,
                          dtype="auto", optimizer="poetx", grad_checkpointing=False,
                          poet=poetx.POETConfig())
    assert fit.fits_replicated(cfg, "cpu") is None
    need = plan("llama-8b", 1024, 1, fit.setting_of(cfg)).required_bytes()
    monkeypatch.setattr(fit, "device_budget", lambda device: need)
    assert fit.fits_replicated(cfg, "cuda") is True
    monkeypatch.setattr(fit, "device_budget", lambda device: need - 1)
    assert fit.fits_replicated(cfg, "cuda") is False


def test_grad_accum_equals_the_whole_batch_in_one_step(reference, dp_corpus, tmp_path):
    # One process: 2 micro-batches of 2 per step against the reference's 4 rows at once.
    from poetx.train.config import TrainConfig
    from poetx.train.loop import train

    out = tmp_path / "accum"
    train(TrainConfig(**_settings(dp_corpus, out, batch_size=2, grad_accum=2)))
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(reference)),
                               rtol=2e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_evals(out)), torch.tensor(_evals(reference)),
                               rtol=2e-5, atol=0)
