"""The memory planner: its parts against the real tensors of a model on CPU, its peaks against
the peaks recorded on a GPU, ``check_fits`` and ``poetx plan``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.plan_check import BENCH_METHODS, compare, compare_largest, compare_scale
from poetx.cli.main import main
from poetx.config import POETConfig
from poetx.layers.poet_linear import POETLinear
from poetx.model.build import build_poet_model, rebuild_hf_rotary
from poetx.model.lm_loss import causal_lm_loss
from poetx.model.wrap import rotation_parameters
from poetx.optim.optimizer import make_optimizer
from poetx.plan.fit import check_fits, flags_of
from poetx.plan.memory import (
    COMPENSATED_CHUNK,
    GIB,
    MIB,
    ModelShape,
    Setting,
    block_bytes,
    plan,
    predict,
    saved_activations,
)
from poetx.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
# Grouped-query attention, an intermediate size that 64 does not divide, untied embeddings.
SHAPE = ModelShape(hidden=128, intermediate=344, layers=3, heads=4, kv_heads=2, vocab=300)
BATCH, SEQ = 2, 24
# Largest |error| of the prediction against the recorded GPU peaks: the planner achieves 1.6%.
GPU_TOLERANCE_PCT = 2.0


def hf_config(shape: ModelShape) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=256, use_cache=False,
        tie_word_embeddings=shape.tie_embeddings,
    )


def build(setting: Setting) -> torch.nn.Module:
    """The model as bench/model.py and poetx train build it, in bf16 on CPU."""
    if setting.optimizer == "adamw":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(hf_config(SHAPE))
        finally:
            torch.set_default_dtype(previous)
    else:
        cfg = POETConfig(block_size=setting.block_size, mode=setting.mode,
                         w0_format=setting.w0_format, quant_group_size=setting.quant_group_size,
                         w0_residual=setting.w0_residual,
                         permuted_saves=setting.permuted_saves,
                         mlp_permutations=setting.mlp_permutations,
                         mlp_frames=setting.mlp_frames)
        model = build_poet_model(lambda: LlamaForCausalLM(hf_config(SHAPE)), cfg, "cpu",
                                 torch.bfloat16, rebuild_buffers=rebuild_hf_rotary)
    if setting.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


SETTINGS = [
    Setting(optimizer="adamw"),
    Setting(mode="mem", block_size=64),
    Setting(mode="fast", block_size=64),
    Setting(mode="mem", block_size=64, checkpointing=True),
    Setting(mode="mem", block_size=64, w0_format="int8", quant_group_size=32),
    Setting(mode="fast", block_size=48, w0_format="fp8", quant_group_size=32),
    Setting(mode="mem", block_size=64, dense_optimizer="adamw-kahan"),
    Setting(mode="mem", block_size=64, dense_optimizer="adamw-fp32-master"),
    Setting(mode="mem", block_size=64, w0_format="int8", quant_group_size=32,
            w0_residual="device"),
    Setting(mode="mem", block_size=64, w0_residual="device"),
    pytest.param(Setting(mode="mem", block_size=64, dense_optimizer="adamw8bit"),
                 marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                          reason="needs torchao")),
    # b = 16 on width 128: 8 blocks of 120 values, too few for 8-bit (torchao keeps them
    # float32); b = 64: 2 x 2016 values, not a multiple of 256 (idem). The embedding and head
    # (300 x 128) are 8-bit.
    pytest.param(Setting(mode="mem", block_size=64, dense_optimizer="adamw8bit",
                         rotation_states="8bit"),
                 marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                          reason="needs torchao")),
]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_block_bytes_follows_the_caching_allocator():
    assert block_bytes(0) == 0
    assert block_bytes(1) == 512
    assert block_bytes(513) == 1024
    assert block_bytes(MIB) == MIB  # small pool, no segment rounding
    assert block_bytes(5 * MIB) == 5 * MIB  # split off a 20 MiB segment
    assert block_bytes(12 * MIB + MIB // 2) == 12 * MIB + MIB // 2  # 1.5 MiB left: split
    assert block_bytes(35_061_760) == 34 * MIB  # 3B d x I bf16: 0.56 MiB left, not split
    assert block_bytes(135 * MIB) == 136 * MIB  # 13B d x I bf16: exactly 1 MiB left
    assert block_bytes(112 * MIB) == 112 * MIB


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_persistent_parts_are_the_models_tensors(setting):
    """Weights, W0 (+ scales), rotations, their gradients and AdamW states, as allocated."""
    model = build(setting)
    opt = make_optimizer(model, lr=1e-3, poet_lr=1e-3, dense_optimizer=setting.dense_optimizer,
                         rotation_8bit=setting.rotation_states == "8bit"
                         ) if setting.optimizer == "poetx" else (
        torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
    batch = torch.randint(0, SHAPE.vocab, (BATCH, SEQ + 1))
    causal_lm_loss(model, batch).backward()
    opt.step()

    rotation = {id(p) for p in rotation_parameters(model)}
    w0 = [t for m in model.modules() if isinstance(m, POETLinear)
          for t in (m.w0, m.w0_scale) if t is not None]
    w0_ids = {id(t) for t in w0}
    linear_ids = {id(m.weight) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    dense = [p for p in model.parameters()
             if id(p) not in rotation | w0_ids | linear_ids]
    linears = [p for p in model.parameters() if id(p) in linear_ids]
    rot = [p for p in model.parameters() if id(p) in rotation]

    def states(params):  # the step counters are scalars, not modelled
        out = []
        for p in params:
            state = opt.state[p] or opt.lowbit.state[p]  # 8-bit: torchao's inner optimizer
            for k, v in state.items():
                if k != "step":  # 8-bit states: their codes, scales and code table
                    out += [v.codes, v.scale, v.qmap] if hasattr(v, "codes") else [v]
        return out

    residual = [t for m in model.modules() if isinstance(m, POETLinear)
                for t in (m.w0_residual, m.w0_residual_scale)
                if t is not None and setting.w0_residual == "device"]
    expected = {
        "w0": nbytes(w0),
        "w0_residual": nbytes(residual),
        "embed_head_norm_weights": nbytes(dense),
        "embed_head_norm_grads": nbytes(p.grad for p in dense),
        "embed_head_norm_states": nbytes(states(dense)),
        "dense_linear_weights": nbytes(linears),
        "dense_linear_grads": nbytes(p.grad for p in linears),
        "dense_linear_states": nbytes(states(linears)),
        "rotation_params": nbytes(rot),
        "rotation_grads": nbytes(p.grad for p in rot),
        "rotation_states": nbytes(states(rot)),
    }
    p = predict(SHAPE, SEQ, BATCH, setting, cuda_allocator=False)
    at_step = p.moments["optimizer-step"]
    assert {k: at_step[k] for k in expected} == expected
    assert at_step["overhead"] == 0


def _recording_saved(model) -> tuple[dict[int, int], Any]:
    """``(saved, hooks)``: inside ``hooks``, every floating tensor autograd saves that is not
    the model's own lands in ``saved`` (storage pointer -> bytes)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    return saved, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


# down_proj's input kept as given, or arriving permuted from a shared MLP permutation (both
# unpadded; the default keeps the padded permuted copy)
SAVES = [Setting(mode="fast", block_size=64, permuted_saves="off"),
         Setting(mode="mem", block_size=64, mlp_permutations="shared"),
         Setting(mode="fast", block_size=64, mlp_frames="fused"),
         Setting(mode="mem", block_size=64, mlp_frames="fused"),
         Setting(mode="fast", block_size=64, permuted_saves="all"),
         Setting(mode="fast", block_size=64, mlp_frames="fused", permuted_saves="all")]


@pytest.mark.parametrize("setting", SETTINGS[:6] + SAVES,
                         ids=lambda s: f"{s.name}-{s.permuted_saves}-{s.mlp_permutations}"
                                       f"-{s.mlp_frames}")
def test_saved_activations_are_what_autograd_keeps(setting):
    """Every floating tensor autograd saves in forward (the loss included), by storage."""
    model = build(setting)
    saved, hooks = _recording_saved(model)
    batch = torch.randint(0, SHAPE.vocab, (BATCH, SEQ + 1))
    with hooks:
        loss = causal_lm_loss(model, batch)
    got = sum(saved.values())

    s = saved_activations(SHAPE, SEQ, BATCH, setting, cuda_allocator=False)
    # The loss's token count is an int64 (not hooked above); the planner counts it separately.
    want = SHAPE.layers * s["kept_layer"] + s["final_norm"] + s["loss_lse"] + s["loss_logits"]
    assert s["loss_logits"] == BATCH * SEQ * SHAPE.vocab * 2  # kept: they fit the limit
    if not setting.checkpointing:
        # under checkpointing cos/sin reach the layers as checkpoint inputs: alive, but not
        # through autograd's hooks
        want += s["rope"]
    assert got == want
    if setting.checkpointing:  # the recomputed layer saves what an unchecked layer does
        plain = saved_activations(SHAPE, SEQ, BATCH, Setting(mode=setting.mode, block_size=64),
                                  cuda_allocator=False)
        assert s["layer"] == plain["layer"]
    loss.backward()


def test_saved_activations_of_compiled_blocks_are_what_autograd_keeps():
    """Decoder blocks compiled around their POET layers (``poetx train``'s captured step)
    through dynamo and AOTAutograd's min-cut partition, inductor's choice of what to keep for
    backward (with pass-through compilers: the partition is decided before code generation):
    the same count as the eager blocks less the norms' float32 input copies."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from poetx.model.compile_blocks import compile_blocks

    setting = Setting(mode="fast", block_size=64, cuda_graphs=True, compile_blocks=True)
    assert setting.blocks_compiled and setting.name.endswith("-graph-compiled")
    model = build(setting)
    torch._dynamo.reset()
    try:
        compile_blocks(model, backend=aot_autograd(
            fw_compiler=lambda gm, _: make_boxed_func(gm),
            bw_compiler=lambda gm, _: make_boxed_func(gm),
            partition_fn=min_cut_rematerialization_partition))
        saved, hooks = _recording_saved(model)
        batch = torch.randint(0, SHAPE.vocab, (BATCH, SEQ + 1))
        with hooks:
            loss = causal_lm_loss(model, batch)
        loss.backward()
    finally:
        torch._dynamo.reset()
    s = saved_activations(SHAPE, SEQ, BATCH, setting, cuda_allocator=False)
    assert sum(saved.values()) == (SHAPE.layers * s["kept_layer"] + s["final_norm"]
                                   + s["loss_lse"] + s["loss_logits"] + s["rope"])
    eager = saved_activations(SHAPE, SEQ, BATCH, Setting(mode="fast", block_size=64),
                              cuda_allocator=False)
    assert eager["layer"] - s["layer"] == 2 * 4 * BATCH * SEQ * SHAPE.hidden
    # compiled only where poetx train compiles: a captured POET-X step
    for other in (Setting(mode="fast", compile_blocks=True),
                  Setting(optimizer="adamw", cuda_graphs=True, compile_blocks=True)):
        assert not other.blocks_compiled


def test_train_config_compiles_blocks_and_the_flags_say_when_not():
    from poetx.plan.fit import flags_of, setting_of

    cfg = TrainConfig(preset="tiny", out="unused")
    setting = setting_of(cfg)
    assert setting.compile_blocks and setting.blocks_compiled
    assert "compile-blocks" not in flags_of(setting)
    off = setting_of(TrainConfig(preset="tiny", out="unused", compile_blocks=False))
    assert not off.blocks_compiled and "--no-compile-blocks" in flags_of(off)


def test_compensated_scratch_constant_matches_the_optimizer():
    from poetx.optim.dense_update import DEFAULT_CHUNK

    assert COMPENSATED_CHUNK == DEFAULT_CHUNK


def test_parts_sum_to_the_peak_and_the_peak_is_the_largest_moment():
    for setting in [s for s in SETTINGS if isinstance(s, Setting)]:
        p = predict(SHAPE, SEQ, BATCH, setting)
        assert sum(p.parts.values()) == p.peak_bytes
        assert p.peak_bytes == max(sum(m.values()) for m in p.moments.values())
        assert p.moments[p.phase] == p.parts


def test_memory_ordering_of_settings_on_8b():
    def peak(**kw):
        return plan("llama-8b", 1024, 1, Setting(**kw)).peak_bytes

    assert peak(optimizer="adamw") > peak(mode="fast") > peak(mode="mem") \
        > peak(mode="mem", checkpointing=True) > peak(mode="mem", checkpointing=True,
                                                       w0_format="int8")
    lean = {"mode": "mem", "checkpointing": True, "w0_format": "int8"}
    assert peak(**lean, dense_optimizer="adamw8bit") < peak(**lean) \
        < peak(**lean, dense_optimizer="adamw-kahan") \
        < peak(**lean, dense_optimizer="adamw-fp32-master")
    # more tokens never need less memory
    for setting in [Setting(optimizer="adamw"), Setting(mode="fast")]:
        peaks = [plan("llama-3b", s, 1, setting).peak_bytes for s in (256, 512, 1024, 2048)]
        assert peaks == sorted(peaks)


def _model_rows(name: str) -> list[dict[str, Any]]:
    return json.loads((REPO / "bench/results" / name).read_text())


# Planner misses above GPU_TOLERANCE_PCT that are known and not yet explained, by (model,
# seq_len, method) of bench/results/model.json. Strict: a planner that predicts the row
# within tolerance fails here until the entry goes.
KNOWN_MISSES = {
    ("llama-3b", 2048, "int8"): (
        "captured Llama-3B int8 W0 at 2048 tokens, 2.1% under: the eager step's snapshot "
        "(bench/peak_snapshot.py, H100) puts the in-step bytes within 0.04 GiB of the planner "
        "and 0.12 GiB more alive before the step than it counts (0.08 for bf16 W0); the "
        "capture adds 0.07 GiB over the eager step. Not measured further yet."),
}


def _row_id(row: dict[str, Any]) -> str:
    graphs = "graph" if row.get("cuda_graphs") else "eager"
    return f"{row['model']}-{row['seq_len']}-{row['method']}-{graphs}"


@pytest.mark.parametrize("row", [
    pytest.param(row, id=_row_id(row), marks=pytest.mark.xfail(
        strict=True, reason=KNOWN_MISSES[(row["model"], row["seq_len"], row["method"])]))
    if (row["model"], row["seq_len"], row["method"]) in KNOWN_MISSES else
    pytest.param(row, id=_row_id(row))
    for row in _model_rows("model.json")])
def test_predictions_match_todays_recorded_gpu_peaks(row):
    """bench/results/model.json (H100, 2026-12-07): each model and method as poetx train runs
    it today (poetx captured, blocks compiled unless checkpointed; AdamW eager or captured)."""
    (r,) = compare([row])
    assert "H100" in r["measured_on"] and "bench.model" in r["measured_by"]
    if r["status"] == "oom":  # ran out of memory on an 80 GB H100
        assert r["predicted_gib"] > 80e9 / GIB
    else:
        assert r["status"] == "ok" and abs(r["error_pct"]) <= GPU_TOLERANCE_PCT, r


def test_predictions_match_the_recorded_gpu_peaks():
    """bench/results/model_1206_h100.json (older code: mostly eager steps, older losses),
    memory_options.json and the 30B run."""
    records = compare(_model_rows("model_1206_h100.json"))
    measured = [r for r in records if r["error_pct"] is not None]
    assert {r["model"] for r in measured} == {"llama-3b", "llama-8b", "llama-13b"}
    assert len(measured) >= 30
    assert all("H100" in r["measured_on"] and ("bench.model" in r["measured_by"]
                                               or "bench/model.py" in r["measured_by"])
               for r in records)
    worst = max(measured, key=lambda r: abs(r["error_pct"]))
    assert abs(worst["error_pct"]) <= GPU_TOLERANCE_PCT, worst
    for r in records:
        if r["status"] == "oom":  # ran out of memory on an 80 GB H100
            assert r["predicted_gib"] > 80e9 / GIB
    # the memory options of issue 13 and the current loss, measured on an H200
    options = compare(json.loads((REPO / "bench/results/memory_options.json").read_text()))
    assert {r["method"] for r in options} >= {"mem-ckpt-lean", "int8-lean", "mem-ckpt"}
    for r in options:
        assert r["status"] == "ok" and abs(r["error_pct"]) <= GPU_TOLERANCE_PCT, r
        assert "H200" in r["measured_on"] and "bench.model" in r["measured_by"]
    # the 32.5B-parameter training run of bench/largest.py (int8 W0, checkpointing, CUDA graph)
    largest = compare_largest(json.loads((REPO / "bench/results/largest.json").read_text()))
    assert largest["model"] == "llama-30b" and largest["batch"] == 2
    assert "H100" in largest["measured_on"] and "bench.largest" in largest["measured_by"]
    assert abs(largest["error_pct"]) <= GPU_TOLERANCE_PCT, largest


def test_step_predictions_match_the_recorded_gpu_peaks():
    """``bench/step.py`` on an H100: the captured Llama-8B and 130M steps with compiled blocks
    (MLP frames fused or not),
    the Llama-8B ones without (1 and 4 GiB apart), and eager AdamW."""
    from bench.plan_check import compare_step

    records = compare_step(json.loads((REPO / "bench/results/step_h100.json").read_text()))
    methods = {r["method"] for r in records}
    assert {"poetx-fast-b256-graph-compiled", "poetx-fast-b256-graph", "adamw"} <= methods
    # the fused SwiGLU frames (today's default) against the unfused MLPs, one H100 call:
    # 3.5 GiB apart at 8B 2 x 2048
    fused_rows = json.loads((REPO / "bench/results/step_fused_frames_h100.json").read_text())
    assert {r["mlp_frames"] for r in fused_rows} == {"off", "fused", None}
    fused = compare_step(fused_rows)
    assert len(fused) == 2 and fused[0]["measured_gib"] - fused[1]["measured_gib"] > 3
    records += fused
    # the fused cross-entropy (logits kept for backward) against the loss before it, one call
    kept = compare_step(json.loads((REPO / "bench/results/step_fused_ce_h100.json").read_text()))
    assert {r["peak_at"] for r in kept} >= {"loss-backward", "layer-backward (last layer)"}
    records += kept
    # issue 10's table (one H100 session): every case, and every layer's input kept permuted
    # (permuted_saves="all"), about 4 GiB above the default at 8B 2 x 2048
    table = compare_step(json.loads((REPO / "bench/results/step.json").read_text()))
    at_8b = {r["method"]: r["predicted_gib"] for r in table if r["batch"] == 2}
    assert len(table) == 7
    kept_all = "poetx-fast-b256-graph-compiled-permsaveall"
    assert 3.5 < at_8b[kept_all] - at_8b["poetx-fast-b256-graph-compiled"] < 4.5
    records += table
    for r in records:
        assert r["status"] == "ok" and abs(r["error_pct"]) <= GPU_TOLERANCE_PCT, r
        assert "H100" in r["measured_on"] and "step.py" in r["measured_by"]


def test_accumulation_predictions_match_the_recorded_gpu_peaks():
    """``poetx train`` at Llama-1B, 16 x 1024 in one batch and 8 x 1024 with ``--grad-accum 2``
    (blocks built once per step, compiled blocks), bench/results/scale.json. The Llama-130M
    rows of the same case are compared by bench/plan_check.py but not held to the tolerance:
    at 8 x 256 x 4 the whole peak is 2.4 GiB and the prediction misses it by 0.05 GiB (-2.1%)."""
    records = compare_scale(json.loads((REPO / "bench/results/scale.json").read_text()))
    billion = [r for r in records if r["model"] == "llama-1b"]
    assert any("accum2" in r["method"] and "H100" in r["measured_on"] for r in billion)
    assert any("accum" not in r["method"] for r in billion)
    for r in billion:
        assert abs(r["error_pct"]) <= GPU_TOLERANCE_PCT, r
        assert "poetx.cli.main train" in r["measured_by"]


def test_every_bench_method_has_a_planner_setting():
    from bench.model import METHODS

    assert set(METHODS) == set(BENCH_METHODS)
    for name, method in METHODS.items():
        setting = Setting(**BENCH_METHODS[name])
        assert setting.optimizer == ("poetx" if method.poetx else "adamw")
        assert setting.checkpointing == method.checkpointing
        assert setting.dense_optimizer == method.dense_optimizer
        if method.poetx:
            assert (setting.mode, setting.w0_format) == (method.mode, method.w0_format)


def test_setting_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        Setting(mode="slow")
    with pytest.raises(ValueError, match="w0_format"):
        Setting(w0_format="int4")
    with pytest.raises(ValueError, match="block_size"):
        Setting(block_size=1)
    with pytest.raises(ValueError, match="dense_optimizer"):
        Setting(dense_optimizer="sgd")
    with pytest.raises(ValueError, match="seq_len"):
        plan("llama-8b", 0, 1, Setting())
    with pytest.raises(ValueError, match="preset"):
        plan("llama-1t", 128, 1, Setting())


def train_config(**poet) -> TrainConfig:
    return TrainConfig(preset="llama-8b", seq_len=1024, batch_size=1, out="unused",
                       poet={"block_size": 256, **poet})


def test_check_fits_names_a_setting_that_fits():
    cfg = train_config(mode="fast")
    with pytest.raises(ValueError) as info:
        check_fits(cfg, "cuda:0", budget_bytes=24 * GIB)
    message = str(info.value)
    assert "llama-8b" in message and "poetx-fast-b256" in message and "24.0 GiB" in message
    suggested = message.split("this fits: ")[1].split(" (predicted")[0]
    assert "--grad-checkpointing" in suggested and "--mode mem" in suggested
    # the suggestion is the largest setting that fits: bf16 W0 with the memory options
    # (8-bit embedding/head states stepped in backward, 8-bit rotation states)
    fits = plan("llama-8b", 1024, 1, Setting(mode="mem", checkpointing=True,
                                             dense_optimizer="adamw8bit", step_in_backward=True,
                                             rotation_states="8bit"))
    assert fits.required_bytes() <= 24 * GIB
    assert flags_of(fits.setting) == suggested

    # the suggestion is a valid `poetx train` command line
    from poetx.cli.main import build_parser

    args = build_parser().parse_args(["train", *suggested.split()])
    assert args.command == "train"

    ok = check_fits(cfg, "cuda:0", budget_bytes=60 * GIB)
    assert ok is not None and ok.setting.mode == "fast"
    assert check_fits(cfg, "cpu") is None


@pytest.mark.parametrize("grad_accum, distributed", [(2, False), (1, True)])
def test_check_fits_suggests_no_step_in_backward_where_the_trainer_refuses_it(grad_accum,
                                                                              distributed):
    cfg = TrainConfig(preset="llama-8b", seq_len=1024, batch_size=1, grad_accum=grad_accum,
                      out="unused", poet={"block_size": 256, "mode": "fast"})
    with pytest.raises(ValueError) as info:
        check_fits(cfg, "cuda:0", budget_bytes=24 * GIB, distributed=distributed)
    suggested = str(info.value).split("this fits: ")[1].split(" (predicted")[0]
    assert "--no-step-in-backward" in suggested and "--grad-checkpointing" in suggested
    fits = plan("llama-8b", 1024, 1, Setting(mode="mem", checkpointing=True,
                                             dense_optimizer="adamw8bit",
                                             rotation_states="8bit"))
    assert fits.required_bytes() <= 24 * GIB


def test_check_fits_suggests_a_smaller_batch_or_says_nothing_fits():
    cfg = TrainConfig(preset="llama-3b", seq_len=2048, batch_size=8, out="unused",
                      optimizer="poetx", poet={"mode": "fast"})
    with pytest.raises(ValueError, match="--batch-size [1-4] "):
        check_fits(cfg, "cuda:0", budget_bytes=10 * GIB)
    with pytest.raises(ValueError, match="no setting fits even at batch size 1"):
        check_fits(cfg, "cuda:0", budget_bytes=2 * GIB)


def test_cli_plan_table_and_json(capsys):
    argv = ["plan", "--preset", "llama-8b", "--seq-len", "1024", "--batch-size", "1",
            "--gpu-mem", "24"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "poetx-mem-ckpt-int8-b256" in table and "fits" in table and "W0" in table

    assert main([*argv, "--json", "--block-sizes", "256,512"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["setting"]: r for r in rows}
    assert by_name["poetx-mem-ckpt-int8-b256"]["fits"] is True
    assert by_name["poetx-fast-b256"]["fits"] is False
    assert by_name["adamw"]["fits"] is False
    assert "poetx-mem-ckpt-b512" in by_name
    for r in rows:
        assert abs(sum(r["parts_gib"].values()) - r["peak_gib"]) < 1e-9
        assert r["fits"] == (r["required_gib"] <= 24)


def test_cli_plan_bad_input(capsys):
    assert main(["plan", "--preset", "nope", "--seq-len", "8", "--batch-size", "1",
                 "--gpu-mem", "8"]) == 1
    assert "preset" in capsys.readouterr().err
    assert main(["plan", "--preset", "tiny", "--seq-len", "0", "--batch-size", "1",
                 "--gpu-mem", "8"]) == 2


ACCUM_SETTINGS = [
    Setting(mode="mem", block_size=64, grad_accum=2),
    Setting(mode="fast", block_size=48, grad_accum=2),  # 128 = 2 x 48 + 32: padded last blocks
    Setting(mode="mem", block_size=64, checkpointing=True, grad_accum=3),
    Setting(optimizer="adamw", grad_accum=2),
]


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("setting", ACCUM_SETTINGS, ids=lambda s: s.name)
def test_accumulation_parts_are_what_the_step_holds(setting):
    """Under ``AccumulatedRotations`` (what the Trainer runs for ``--grad-accum K``), what the
    micro-batches before the last leave: the step's blocks, their float32 gradient sum and the
    ordinary parameters' gradients, against the planner's parts of the last micro-batch."""
    from poetx.layers.rotation_groups import AccumulatedRotations

    model = build(setting)
    layers = [m for m in model.modules() if isinstance(m, POETLinear)]
    k = setting.grad_accum
    batch = torch.randint(0, SHAPE.vocab, (k, BATCH, SEQ + 1))
    rotation = {id(p) for p in rotation_parameters(model)}
    with AccumulatedRotations(layers, k) as rotations:
        for i in range(k - 1):
            rotations.micro_batch(i)
            (causal_lm_loss(model, batch[i]) / k).backward()
        builds = list({id(b): b for b, _ in rotations.builds.values()}.values())
        blocks = _storages(t for b in builds for t in b.blocks)
        # two scalars per build call: the handles' anchor and the leaf they hang from
        anchors = _storages([b.carry.handles[0] for b in builds] + [b.carry.root for b in builds])
        # one buffer per build call, the Grams' sums
        block_grads = _storages(b.carry.sink.data for b in builds if b.carry.sink.data is not None)
        left = [p for p in model.parameters() if p.grad is not None]
        rotations.micro_batch(k - 1)
        (causal_lm_loss(model, batch[k - 1]) / k).backward()
    assert all(id(p) not in rotation for p in left)  # skew gradients: in the last backward
    assert all(p.grad is not None for p in model.parameters() if id(p) in rotation)

    p = predict(SHAPE, SEQ, BATCH, setting, cuda_allocator=False)
    last = p.moments["loss-forward"]
    assert last["accumulated_blocks"] == sum(blocks.values()) + sum(anchors.values())
    assert last["block_grads"] == sum(block_grads.values())
    assert last["embed_head_norm_grads"] + last["dense_linear_grads"] == nbytes(
        p.grad for p in left)
    if setting.optimizer == "poetx":
        assert len(builds) > 0 and len(block_grads) == len(builds)
    else:
        assert not builds
    assert p.moments["optimizer-step"]["accumulated_blocks"] == 0
    assert p.moments["optimizer-step"]["block_grads"] == 0


@pytest.mark.parametrize("setting", ACCUM_SETTINGS[:2], ids=lambda s: s.name)
def test_saved_activations_under_accumulation_leave_the_blocks_to_the_step(setting):
    """Each micro-batch saves what a step of one batch saves, except the blocks (fast mode
    saves the step's, counted once in ``accumulated_blocks``)."""
    from poetx.layers.rotation_groups import AccumulatedRotations

    model = build(setting)
    layers = [m for m in model.modules() if isinstance(m, POETLinear)]
    saved, hooks = _recording_saved(model)
    batch = torch.randint(0, SHAPE.vocab, (BATCH, SEQ + 1))
    with AccumulatedRotations(layers, setting.grad_accum) as rotations:
        rotations.micro_batch(0)
        with hooks:
            loss = causal_lm_loss(model, batch)
        step_blocks = _storages(t for b, _ in rotations.builds.values() for t in b.blocks)
        loss.backward()
    got = sum(v for ptr, v in saved.items() if ptr not in step_blocks)
    s = saved_activations(SHAPE, SEQ, BATCH, setting, cuda_allocator=False)
    assert got == (SHAPE.layers * s["kept_layer"] + s["final_norm"] + s["loss_lse"]
                   + s["loss_logits"] + s["rope"])
    if setting.mode == "fast":
        assert set(step_blocks) <= set(saved)


def test_one_micro_batch_is_the_plain_step():
    for setting in [s for s in SETTINGS if isinstance(s, Setting)]:
        p = predict(SHAPE, SEQ, BATCH, setting)
        assert p.parts["accumulated_blocks"] == p.parts["block_grads"] == 0
        assert "accum" not in setting.name and "rotation-link (first layer)" not in p.moments
    with pytest.raises(ValueError, match="grad_accum"):
        Setting(grad_accum=0)
    with pytest.raises(ValueError, match="step_in_backward"):
        Setting(grad_accum=2, step_in_backward=True, dense_optimizer="adamw8bit")


def test_check_fits_and_cli_plan_count_the_accumulation(capsys):
    def cfg(k: int) -> TrainConfig:
        return TrainConfig(preset="llama-1b", seq_len=1024, batch_size=4, grad_accum=k,
                           out="unused", poet={"mode": "fast"})

    one = check_fits(cfg(1), "cuda:0", budget_bytes=80 * GIB)
    two = check_fits(cfg(2), "cuda:0", budget_bytes=80 * GIB)
    assert one.setting.grad_accum == 1 and two.setting.grad_accum == 2
    assert two.peak_bytes > one.peak_bytes
    budget = (one.required_bytes() + two.required_bytes()) // 2
    assert check_fits(cfg(1), "cuda:0", budget_bytes=budget) is not None
    with pytest.raises(ValueError) as info:
        check_fits(cfg(2), "cuda:0", budget_bytes=budget)
    suggested = str(info.value).split("this fits: ")[1].split(" (predicted")[0]
    assert "--grad-accum 2" in suggested and "--no-step-in-backward" in suggested

    assert main(["plan", "--preset", "llama-1b", "--seq-len", "1024", "--batch-size", "4",
                 "--gpu-mem", "24", "--grad-accum", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["setting"].endswith("accum2") for r in rows)
    assert not any(r["options"]["step_in_backward"] for r in rows)
    by_name = {r["setting"]: r for r in rows}
    fast = by_name["poetx-fast-b256-accum2"]
    assert fast["parts_gib"]["accumulated_blocks"] > 0 and fast["parts_gib"]["block_grads"] > 0
