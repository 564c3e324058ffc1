"""Bad input raises a clear error that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import poetx
from poetx import POETConfig, POETLinear


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("block_size", 1, "block_size"),
        ("block_size", 2.5, "block_size"),
        ("merge_every", 0, "merge_every"),
        ("neumann_terms", 0, "neumann_terms"),
        ("neumann_terms", 99, "neumann_terms"),
        ("mode", "quick", "mode"),
        ("init", "xavier", "init"),
        ("w0_format", "int4", "w0_format"),
        ("exclude", ("",), "exclude"),
    ],
)
def test_config_rejects_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        POETConfig(**{field: value})


def test_config_round_trip():
    cfg = POETConfig(block_size=64, exclude=("down_proj",), neumann_terms=None)
    assert POETConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        POETConfig.from_dict({"blocksize": 3})


def test_wrong_input_shape_names_layer_and_sizes():
    layer = POETLinear(16, 8, config=POETConfig(block_size=8), name="mlp.up")
    with pytest.raises(ValueError, match=r"mlp.up.*7.*expected 16"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 16, dtype=torch.long))


def test_wrong_weight_and_module_types():
    layer = POETLinear(16, 8, config=POETConfig(block_size=8))
    with pytest.raises(ValueError, match=r"\(8, 16\)"):
        layer.set_dense_weight(torch.randn(16, 8))
    with pytest.raises(TypeError, match="nn.Linear"):
        POETLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="no nn.Linear"):
        poetx.wrap(nn.Sequential(nn.ReLU()))


def test_optimizer_arguments_are_checked():
    model = nn.Sequential(nn.Linear(8, 8))
    poetx.wrap(model, POETConfig(block_size=4))
    with pytest.raises(ValueError, match="poet_lr"):
        poetx.make_optimizer(model, lr=1e-3, poet_lr=0)
    with pytest.raises(ValueError, match="lr"):
        poetx.make_optimizer(model, lr=-1, poet_lr=1e-3)
