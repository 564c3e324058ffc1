"""Compensated AdamW: bf16 parameters keep their small updates; float32 ones are untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poetx.config import POETConfig
from poetx.model.wrap import rotation_parameters, wrap
from poetx.optim.dense_update import CompensatedAdamW, make_dense_variant
from poetx.optim.merge import MergeSchedule
from poetx.optim.optimizer import make_optimizer

BF16_SPACING_BELOW_1 = 2.0**-8


def reference_adamw(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float,
                    betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """AdamW whose parameter accumulates in float64 and is never rounded. Its moments are float32
    arithmetic stored in bf16 between steps, as the optimizer keeps them (each step uses them
    before that rounding): a one-ulp flip of a stored moment would otherwise dominate."""
    p = p0.double().clone()
    m = torch.zeros_like(p0, dtype=torch.bfloat16)
    v = torch.zeros_like(m)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.float()
        m_t = m.float().mul_(b1).add_(g, alpha=1 - b1)
        v_t = v.float().mul_(b2).addcmul_(g, g, value=1 - b2)
        m, v = m_t.bfloat16(), v_t.bfloat16()
        p = p * (1 - lr * wd)
        denom = (v_t.double().sqrt() / (1 - b2**t) ** 0.5) + eps
        p = p - lr / (1 - b1**t) * m_t.double() / denom
    return p


@pytest.mark.parametrize("compensation", ["kahan", "fp32-master"])
def test_tiny_updates_move_a_bf16_parameter(compensation):
    """Each update (1e-4) is far below half the bf16 spacing at 1.0: plain bf16 AdamW never
    moves the parameter; the compensated one moves it by the sum of the updates."""
    steps, lr = 100, 1e-4
    grads = [torch.full((1000,), 0.5) for _ in range(steps)]

    plain = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([plain], lr=lr, weight_decay=0.0, foreach=True)
    comp = nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    copt = CompensatedAdamW([comp], lr=lr, weight_decay=0.0, compensation=compensation,
                            chunk_elements=300)
    for g in grads:
        plain.grad = g.bfloat16()
        comp.grad = g.bfloat16()
        opt.step()
        copt.step()
    assert torch.equal(plain, torch.ones_like(plain))  # every update rounded away

    want = reference_adamw(torch.ones(1000), grads, lr, 0.0)
    # a constant gradient moves AdamW by ~lr per step (bf16 moments: within 2%)
    assert abs((1 - float(want[0])) - steps * lr) < 0.02 * steps * lr
    # the bf16 value is the nearest one to the true trajectory
    assert (comp.double() - want).abs().max() <= BF16_SPACING_BELOW_1 / 2
    assert comp.dtype == torch.bfloat16
    if compensation == "fp32-master":
        master = copt.state[comp]["master"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.double(), want, rtol=0, atol=1e-6)
    else:  # parameter + carried error is the true value, up to the bf16 rounding of the
        # carried error (at most 2^-8 / 2 * 2^-9 per step near 1.0)
        total = comp.double() + copt.state[comp]["compensation"].double()
        torch.testing.assert_close(total, want, rtol=0, atol=steps * 2.0**-18)


@pytest.mark.parametrize("compensation", ["kahan", "fp32-master"])
def test_matches_float64_adamw_with_weight_decay(compensation):
    torch.manual_seed(0)
    p0 = torch.randn(37, 29)
    grads = [torch.randn(37, 29) * 0.1 for _ in range(20)]
    p = nn.Parameter(p0.bfloat16())
    opt = CompensatedAdamW([p], lr=3e-3, weight_decay=0.1, compensation=compensation,
                           chunk_elements=100)
    for g in grads:
        p.grad = g.bfloat16()
        opt.step()
    want = reference_adamw(p0.bfloat16().float(), [g.bfloat16().float() for g in grads],
                           3e-3, 0.1)
    state = opt.state[p]
    if compensation == "fp32-master":
        torch.testing.assert_close(state["master"].double(), want, rtol=0, atol=1e-5)
    else:  # the carried error loses at most half a bf16 spacing of itself per step
        total = p.double() + state["compensation"].double()
        bound = len(grads) * want.abs().max() * 2.0**-8 * 2.0**-9
        torch.testing.assert_close(total, want, rtol=0, atol=float(bound))
    assert (p.double() - want).abs().max() <= want.abs().max() * 2.0**-8


def test_float32_parameters_step_exactly_as_torch_adamw():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(50))
    b = nn.Parameter(a.detach().clone())
    low = nn.Parameter(torch.randn(50).bfloat16())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.05, foreach=True)
    opt = CompensatedAdamW([b, low], lr=1e-2, weight_decay=0.05, foreach=True)
    for _ in range(5):
        g = torch.randn(50)
        a.grad, b.grad, low.grad = g.clone(), g.clone(), g.bfloat16()
        ref.step()
        opt.step()
    assert torch.equal(a, b)
    assert low.grad is not None  # the hidden gradient is given back


def test_state_dict_round_trip_keeps_master_float32_and_the_trajectory():
    torch.manual_seed(2)
    grads = [torch.randn(64) * 0.01 for _ in range(6)]

    def run(split: bool) -> torch.Tensor:
        p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
        opt = CompensatedAdamW([p], lr=1e-4, compensation="fp32-master")
        for i, g in enumerate(grads):
            if split and i == 3:
                saved = opt.state_dict()
                p2 = nn.Parameter(p.detach().clone())
                opt = CompensatedAdamW([p2], lr=1e-4, compensation="fp32-master")
                opt.load_state_dict(saved)
                assert opt.state[p2]["master"].dtype == torch.float32
                p = p2
            p.grad = g.bfloat16()
            opt.step()
        return opt.state[p]["master"].clone()

    assert torch.equal(run(False), run(True))


def test_make_optimizer_option_and_merge_schedule():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 48), nn.LayerNorm(48),
                          nn.Linear(48, 40)).to(torch.bfloat16)
    cfg = POETConfig(block_size=16, merge_every=2)
    wrap(model, cfg)
    opt = make_optimizer(model, lr=1e-3, poet_lr=1e-3, dense_optimizer="adamw-kahan")
    assert isinstance(opt, CompensatedAdamW)
    assert {g["name"] for g in opt.param_groups} == {"poet", "decay", "no_decay"}
    schedule = MergeSchedule(model, opt, cfg)
    ids = torch.randint(0, 40, (8,))
    emb_before = model[0].weight.detach().clone()
    for _ in range(2):
        model(ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
    assert schedule.merges == 1
    for p in rotation_parameters(model):
        assert p.dtype == torch.float32  # Adam restarted in place by the merge (re-warm)
        assert not opt.state.get(p, {}) or not opt.state[p]["exp_avg"].any()
    assert "compensation" in opt.state[model[0].weight]
    assert not torch.equal(model[0].weight, emb_before)
    with pytest.raises(ValueError, match="dense_optimizer"):
        make_dense_variant("adamw-magic", [{"params": [nn.Parameter(torch.ones(2))]}])
    with pytest.raises(ValueError, match="compensation"):
        CompensatedAdamW([nn.Parameter(torch.ones(2))], compensation="none")


def test_lowbit_adamw_states_are_8bit_and_tiny_updates_survive_in_expectation():
    pytest.importorskip("torchao")
    from poetx.optim.dense_update import LowBitAdamW

    steps, lr, n = 60, 1e-4, 4096
    emb = nn.Parameter(torch.ones(n // 256, 256, dtype=torch.bfloat16))
    norm = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))  # a vector: Kahan, bf16 states
    rot = nn.Parameter(torch.zeros(300))
    ref_rot = nn.Parameter(torch.zeros(300))
    groups = [{"params": [rot], "lr": lr, "weight_decay": 0.0, "name": "poet"},
              {"params": [emb, norm], "lr": lr, "weight_decay": 0.0, "name": "decay"}]
    opt = LowBitAdamW(groups, lr=lr, foreach=True)
    ref = torch.optim.AdamW([ref_rot], lr=lr, weight_decay=0.0, foreach=True)
    torch.manual_seed(0)
    for _ in range(steps):
        g = torch.randn(300)
        rot.grad, ref_rot.grad = g.clone(), g.clone()
        emb.grad = torch.full(emb.shape, 0.5, dtype=torch.bfloat16)
        norm.grad = torch.full((64,), 0.5, dtype=torch.bfloat16)
        opt.step()
        ref.step()
    assert torch.equal(rot, ref_rot)  # float32 parameters: torch's AdamW, untouched
    inner = opt.lowbit.state[emb]
    codes = inner["exp_avg"]
    assert type(codes).__name__ == "OptimState8bit"
    assert codes.codes.dtype == torch.uint8 and codes.codes.numel() == n
    assert codes.scale.numel() == n // 256
    assert norm not in opt.lowbit.state and opt.state[norm]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[norm]["compensation"].dtype == torch.bfloat16
    # Kahan keeps the norm's sub-spacing updates: parameter + carried error moved by their sum
    kept = norm.float() + opt.state[norm]["compensation"].float()
    assert abs(1 - kept.mean().item() - steps * lr) < 0.02 * steps * lr
    # every update (1e-4) is below half the bf16 spacing at 1.0; plain bf16 AdamW would not move
    # at all, stochastic rounding moves the mean by the sum of the updates
    moved = 1 - emb.float().mean().item()
    assert abs(moved - steps * lr) < 0.15 * steps * lr, moved
    # lr follows the outer group (a schedule writes floats)
    opt.param_groups[1]["lr"] = 0.0
    before = emb.detach().clone()
    emb.grad = torch.full(emb.shape, 0.5, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(emb, before)
    # state round trip
    sd = opt.state_dict()
    again = LowBitAdamW([{"params": [rot], "name": "poet"}, {"params": [emb, norm]}], lr=lr)
    again.load_state_dict(sd)
    assert float(again.lowbit.state[emb]["step"]) == steps + 1


def test_compensated_state_survives_the_checkpoint_format(tmp_path):
    """Through ``poetx train``'s optimizer checkpoint (safetensors + JSON): the compensation /
    master tensors come back with their dtype, and the next step is bitwise the same."""
    from safetensors.torch import save_file

    from poetx.train.checkpoint.format import OPTIMIZER_FILE
    from poetx.train.checkpoint.optimizer_state import load_optimizer_state, optimizer_to_tensors

    for compensation in ("kahan", "fp32-master"):
        torch.manual_seed(4)

        def fresh(compensation=compensation):
            emb = nn.Parameter(torch.randn(20, 8).bfloat16())
            rot = nn.Parameter(torch.zeros(30))
            groups = [{"params": [rot], "name": "poet"}, {"params": [emb], "name": "decay"}]
            return emb, rot, CompensatedAdamW(groups, lr=1e-3, compensation=compensation)

        emb, rot, opt = fresh()
        for _ in range(3):
            emb.grad, rot.grad = torch.randn(20, 8).bfloat16(), torch.randn(30)
            opt.step()
        tensors, meta = optimizer_to_tensors(opt)
        save_file(tensors, str(tmp_path / OPTIMIZER_FILE))
        emb2, rot2, opt2 = fresh()
        with torch.no_grad():
            emb2.copy_(emb)
            rot2.copy_(rot)
        load_optimizer_state(tmp_path, opt2, {"optimizer": meta})
        key = "compensation" if compensation == "kahan" else "master"
        assert opt2.state[emb2][key].dtype == opt.state[emb][key].dtype
        g_emb, g_rot = torch.randn(20, 8).bfloat16(), torch.randn(30)
        emb.grad, rot.grad, emb2.grad, rot2.grad = g_emb, g_rot, g_emb.clone(), g_rot.clone()
        opt.step()
        opt2.step()
        assert torch.equal(emb, emb2) and torch.equal(rot, rot2)
