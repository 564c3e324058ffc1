"""Checkpoint format: round trip, manifest verification, atomic saves, pruning."""

from __future__ import annotations

import json
import os

import pytest
import torch

import poetx.train.checkpoint.store as ck
from poetx import MergeSchedule, make_optimizer
from poetx.model.wrap import poet_layers
from poetx.train.checkpoint import (
    CheckpointError,
    clean_stale,
    list_checkpoints,
    load_model_state,
    load_optimizer_state,
    read_state,
    resolve_resume,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from poetx.train.config import TrainConfig
from poetx.train.run_model import build_run_model

VOCAB = 300


def make(seed: int = 0, vocab: int = VOCAB, int8: bool = False):
    torch.manual_seed(seed)
    poet = {"merge_every": 2, "seed": seed}
    if int8:
        poet["w0_format"] = "int8"
    cfg = TrainConfig(poet=poet, seed=seed)
    model = build_run_model(cfg, vocab, torch.device("cpu"), torch.float32)
    opt = make_optimizer(model, lr=1e-2, poet_lr=5e-3)
    return cfg, model, opt


def step(model, opt, merge=None, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 17), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    if merge is not None:
        merge.step()


def save(root, at, model, opt, **kw):
    return save_checkpoint(root, at, model, opt, {"config": {}, "note": "test"}, **kw)


def test_round_trip_restores_everything(tmp_path):
    cfg, model, opt = make()
    merge = MergeSchedule(model, opt, cfg.poet)
    for i in range(3):  # a merge at step 2: new permutations and merge counters
        step(model, opt, merge, seed=i)
    torch.manual_seed(99)
    path = save(tmp_path, 3, model, opt)
    expected_rng = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "state.json"]
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors",
                                      "rng.safetensors", "state.json"}

    _, fresh, fresh_opt = make(seed=1)  # different init, permutations and W0
    state = read_state(path)
    load_model_state(path, fresh)
    load_optimizer_state(path, fresh_opt, state)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
    assert int(next(iter(poet_layers(fresh)))[1].merge_count) == 1
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for idx in sa["state"]:
        for key, value in sa["state"][idx].items():
            assert torch.equal(value, sb["state"][idx][key]), (idx, key)
    restore_rng(path, state)
    assert torch.equal(torch.rand(3), expected_rng)
    assert state["note"] == "test" and state["step"] == 3


def test_int8_w0_round_trip(tmp_path):
    _, model, opt = make(int8=True)
    step(model, opt)
    path = save(tmp_path, 1, model, opt)
    _, fresh, fresh_opt = make(seed=3, int8=True)
    load_model_state(path, fresh)
    layer = fresh.model.layers[0].self_attn.q_proj
    assert layer.w0.dtype == torch.int8
    assert torch.equal(layer.w0_scale, model.model.layers[0].self_attn.q_proj.w0_scale)


@pytest.fixture
def saved(tmp_path):
    _, model, opt = make()
    step(model, opt)
    return save(tmp_path / "ckpts", 1, model, opt), model, opt


def _flip_byte(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_file_is_named(saved):
    path, _, _ = saved
    _flip_byte(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its sha256"):
        verify_checkpoint(path)


def test_truncated_file_is_named(saved):
    path, _, _ = saved
    f = path / "optimizer.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is truncated"):
        verify_checkpoint(path)


def test_missing_manifest_and_missing_file(saved):
    path, _, _ = saved
    (path / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng\.safetensors is missing"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_checkpoint(path)


def test_mismatched_model_is_refused_naming_the_tensor(saved):
    path, _, _ = saved
    _, other, _ = make(vocab=VOCAB + 10)
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight.*shape"):
        load_model_state(path, other)
    dense = build_run_model(TrainConfig(optimizer="adamw"), VOCAB, torch.device("cpu"),
                            torch.float32)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_model_state(path, dense)


def test_failed_save_leaves_no_temporary_and_keeps_old_checkpoints(saved, monkeypatch):
    path, model, opt = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = ck.save_file
    calls = {"n": 0}

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file: the model file is already written
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing)
    root = path.parent
    with pytest.raises(CheckpointError, match="step_00000002.*No space left"):
        save(root, 2, model, opt, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    verify_checkpoint(path)

    # An interrupt during a save cleans up too, and is re-raised as such.
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(root, 2, model, opt)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_keep_last_and_resave(tmp_path):
    _, model, opt = make()
    for at in (1, 2, 3, 4):
        save(tmp_path, at, model, opt, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    step(model, opt)
    save(tmp_path, 4, model, opt, keep_last=2)  # same step again replaces it atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    verify_checkpoint(tmp_path / "step_00000004")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / "step_00000005.tmp-999999999"
    dead.mkdir()
    alive = tmp_path / f"step_00000006.tmp-{os.getppid()}"
    alive.mkdir()
    clean_stale(tmp_path)
    assert not dead.exists() and alive.exists()


def test_resume_refuses_a_corrupt_newest_checkpoint(tmp_path):
    _, model, opt = make()
    save(tmp_path, 1, model, opt)
    newest = save(tmp_path, 2, model, opt)
    assert resolve_resume(tmp_path) == newest
    _flip_byte(newest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step_00000002.*unusable.*step_00000001"):
        resolve_resume(tmp_path)
    assert resolve_resume(tmp_path, tmp_path / "step_00000001").name == "step_00000001"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(tmp_path / "empty")


def test_state_json_is_plain_json(saved):
    path, _, _ = saved
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == "poetx-checkpoint"
    assert {p["name"] for p in state["optimizer"]["param_groups"]} == {"poet", "decay",
                                                                       "no_decay"}
    header = (path / "model.safetensors").read_bytes()[:20000]
    assert b"pickle" not in header
