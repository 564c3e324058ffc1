"""``POETAdamW``: the one-object optimizer against the explicit make_optimizer + MergeSchedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import poetx
from poetx import POETAdamW, POETConfig, POETLinear

from .test_wrap_optim import Toy

STEPS = 11
MERGE_EVERY = 4


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return poetx.wrap(Toy().double(), POETConfig(block_size=8, merge_every=MERGE_EVERY))


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (4, 6), generator=gen) for _ in range(n)]


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))


def _cosine(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)


def test_one_object_equals_explicit_optimizer_and_schedule():
    explicit, dropin = _model(), _model()
    opt = poetx.make_optimizer(explicit, lr=3e-2, poet_lr=1e-2, weight_decay=0.1)
    schedule = poetx.MergeSchedule(explicit, opt, explicit.block["up"].config,
                                   clip_warmup_steps=2, clip_warmup_start=0.2)
    sched_a = _cosine(opt)
    one = POETAdamW(dropin, lr=3e-2, poet_lr=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                    clip_warmup_steps=2, clip_warmup_start=0.2)
    sched_b = _cosine(one)
    params = [p for g in opt.param_groups for p in g["params"]]
    for ids in _batches(STEPS):
        _loss(explicit, ids).backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.clip_value(0.5), foreach=True)
        opt.step()
        opt.zero_grad()
        sched_a.step()
        schedule.step()

        _loss(dropin, ids).backward()
        one.step()
        one.zero_grad()
        sched_b.step()
    assert schedule.merges == one.merges == STEPS // MERGE_EVERY
    for (name, a), b in zip(explicit.state_dict().items(), dropin.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in one.param_groups]


def test_step_merges_and_clears_only_rotation_state():
    model = _model()
    one = POETAdamW(model, lr=1e-2)
    assert [g["name"] for g in one.param_groups] == ["poet", "decay", "no_decay"]
    layer = model.block["up"]
    for i, ids in enumerate(_batches(MERGE_EVERY)):
        _loss(model, ids).backward()
        w_before = layer.effective_weight(torch.float64)
        one.step()
        one.zero_grad()
        if i < MERGE_EVERY - 1:
            assert one.merges == 0 and layer.theta_in.abs().sum() > 0
    assert one.merges == 1 and int(layer.merge_count) == 1
    assert layer.theta_in.abs().sum() == 0 and layer.theta_out.abs().sum() == 0
    for p in (layer.theta_in, layer.theta_out):  # Adam re-warms: first moment zeroed
        assert not one.state.get(p) or not one.state[p]["exp_avg"].any()
    assert model.embed.weight in one.state  # ordinary parameters keep Adam's moments
    # The merge folded the last update into W0: the function is that of the updated rotations.
    assert not torch.equal(layer.effective_weight(torch.float64), w_before)


def test_state_dict_round_trip_resumes_exactly():
    batches = _batches(STEPS)
    model = _model()
    one = POETAdamW(model, lr=2e-2, max_grad_norm=1.0, clip_warmup_steps=3)
    sched = _cosine(one)
    saved = None
    for i, ids in enumerate(batches):
        if i == 6:  # after a merge, inside the clip warm-up
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(one.state_dict()),
                     copy.deepcopy(sched.state_dict()))
        _loss(model, ids).backward()
        one.step()
        one.zero_grad()
        sched.step()

    resumed = _model(seed=123)  # other init and permutations: everything must come from `saved`
    resumed.load_state_dict(saved[0])
    again = POETAdamW(resumed, lr=2e-2, max_grad_norm=1.0, clip_warmup_steps=3)
    sched_again = _cosine(again)
    again.load_state_dict(saved[1])
    sched_again.load_state_dict(saved[2])
    assert again.merge_schedule.state_dict() == {"steps": 6, "merges": 1, "last_merge_step": 4,
                                                   "early_merges": 0}
    for ids in batches[6:]:
        _loss(resumed, ids).backward()
        again.step()
        again.zero_grad()
        sched_again.step()
    assert again.merges == one.merges
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_merge_every_override_and_errors():
    model = _model()
    one = POETAdamW(model, lr=1e-2, merge_every=2)
    for ids in _batches(2):
        _loss(model, ids).backward()
        one.step()
    assert one.merges == 1
    assert all(layer.config.merge_every == MERGE_EVERY
               for layer in model.modules() if isinstance(layer, POETLinear))

    scaled = POETAdamW(model, lr=2e-2, poet_lr_scale=0.5)
    assert [g["lr"] for g in scaled.param_groups] == [1e-2, 2e-2, 2e-2]

    with pytest.raises(ValueError, match="no POETLinear"):
        POETAdamW(Toy(), lr=1e-2)
    with pytest.raises(TypeError, match="wrapped model"):
        POETAdamW(list(model.parameters()), lr=1e-2)
    with pytest.raises(ValueError, match="not both"):
        POETAdamW(model, poet_lr=1e-3, poet_lr_scale=0.5)
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        POETAdamW(model, clip_warmup_steps=5)
    with pytest.raises(ValueError, match="POETAdamW"):
        POETAdamW(model).load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
