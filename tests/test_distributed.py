"""POET-X under DistributedDataParallel (gloo on CPU): ranks stay identical through merges and
match one process that sees the whole batch."""

from __future__ import annotations

import os
import socket

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
