"""wrap / unwrap, the optimizer groups and the merge schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import poetx
from poetx import MergeSchedule, POETConfig, POETLinear


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.block = nn.ModuleDict(
            {"up": nn.Linear(24, 40), "down": nn.Linear(40, 24, bias=False)}
        )
        self.norm = nn.LayerNorm(24)
        self.lm_head = nn.Linear(24, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block["down"](torch.relu(self.block["up"](h)))
        return self.lm_head(self.norm(h))


def test_wrap_replaces_eligible_layers_only():
    model = poetx.wrap(Toy(), POETConfig(block_size=8, exclude=("down",)))
    assert isinstance(model.block["up"], POETLinear)
    assert type(model.block["down"]) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    assert model.block["up"].layer_name == "block.up"


def test_tied_output_embedding_is_never_wrapped():
    model = Toy()
    model.lm_head.weight = model.embed.weight
    poetx.wrap(model, POETConfig(block_size=8))
    assert type(model.lm_head) is nn.Linear


def test_wrap_unwrap_round_trip_keeps_outputs():
    torch.manual_seed(0)
    model = Toy().double()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        before = model(ids)
    poetx.wrap(model, POETConfig(block_size=8, init="keep"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)
        for layer in model.modules():
            if isinstance(layer, POETLinear):
                layer.theta_in.normal_(0, 0.1)
                layer.theta_out.normal_(0, 0.1)
        rotated = model(ids)
    poetx.unwrap(model)
    assert not any(isinstance(m, POETLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), rotated)


def test_optimizer_groups():
    model = poetx.wrap(Toy(), POETConfig(block_size=8))
    opt = poetx.make_optimizer(model, lr=1e-3, poet_lr=5e-4, weight_decay=0.1)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["poet"]["lr"] == 5e-4 and groups["poet"]["weight_decay"] == 0.0
    poet_ids = {id(p) for p in groups["poet"]["params"]}
    up = model.block["up"]
    assert poet_ids == {id(up.theta_in), id(up.theta_out), id(model.block["down"].theta_in),
                        id(model.block["down"].theta_out)}
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(up.w0) not in all_ids
    assert id(model.embed.weight) in {id(p) for p in groups["decay"]["params"]}
    assert id(up.bias) in {id(p) for p in groups["no_decay"]["params"]}


@pytest.mark.parametrize("restart", ["reset", "rewarm"])
def test_merge_schedule_merges_and_resets_only_rotation_state(restart):
    torch.manual_seed(0)
    cfg = POETConfig(block_size=8, merge_every=3, adam_restart=restart, max_q_norm=0)
    model = poetx.wrap(Toy(), cfg)
    opt = poetx.make_optimizer(model, lr=1e-2, poet_lr=1e-2)
    sched = MergeSchedule(model, opt, cfg, clip_warmup_steps=4, clip_warmup_start=0.25)
    ids = torch.randint(0, 50, (4, 6))
    for step in range(1, 7):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        rot_params = opt.param_groups[0]["params"]
        before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in rot_params}
        ptrs = {id(p): opt.state[p]["exp_avg_sq"].data_ptr() for p in rot_params}
        merged = sched.step()
        assert merged == (step % 3 == 0)
        if merged:
            for p in rot_params:  # restarted in place: same storage
                state = opt.state[p]
                assert state["exp_avg_sq"].data_ptr() == ptrs[id(p)]
                assert state["exp_avg"].abs().sum() == 0
                if restart == "reset":  # as a fresh state
                    assert state["exp_avg_sq"].abs().sum() == 0 and float(state["step"]) == 0
                else:  # second moment kept as its mean, step count kept
                    old = before[id(p)]
                    torch.testing.assert_close(
                        state["exp_avg_sq"], old["exp_avg_sq"].mean().expand_as(old["exp_avg_sq"]))
                    assert float(state["step"]) == float(old["step"])
            assert float(opt.state[model.embed.weight]["step"]) == step
            assert model.block["up"].theta_in.abs().sum() == 0
            assert int(model.block["up"].merge_count) == step // 3
            assert sched.clip_value(1.0) == pytest.approx(0.25)
        else:
            assert all(id(p) in {id(q) for q in opt.state} for p in rot_params)
    sched.steps += 2
    assert sched.clip_value(1.0) == pytest.approx(0.25 + 0.75 * 2 / 4)
    restored = MergeSchedule(model, opt, cfg)
    restored.load_state_dict(sched.state_dict())
    assert restored.state_dict() == sched.state_dict()


def test_merge_keeps_model_function():
    # Exact Cayley forward: the merge folds exactly the rotations the forward applies. (With the
    # truncated series the function changes by ~||Q||^4, see tests/test_fidelity.py.)
    torch.manual_seed(0)
    model = poetx.wrap(Toy().double(), POETConfig(block_size=8, neumann_terms=None))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, POETLinear):
                m.theta_out.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        before = model(ids)
        from poetx.model.wrap import merge_all_

        assert merge_all_(model) == 2
        torch.testing.assert_close(model(ids), before)
