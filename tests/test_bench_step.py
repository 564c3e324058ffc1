"""The step benchmark's kernel families (``bench.step.kernel_kind``), on kernel names seen in
profiles of H100/H200 training steps."""

from __future__ import annotations

import pytest

from bench.step import kernel_kind


@pytest.mark.parametrize("name,kind", [
    ("_cn_fwd_mm_kernel", "cayley-neumann"),
    ("_cn_bwd_wpack_kernel", "cayley-neumann"),
    ("_rotate_tma_kernel", "block rotation / gram / permutation"),
    ("_gram_kernel", "block rotation / gram / permutation"),
    ("_permute_kernel", "block rotation / gram / permutation"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("flash_fwd_kernel", "attention"),
    ("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "attention"),
    ("Memcpy DtoD (Device -> Device)", "copy / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
     "copy / fill"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reduction"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<>>",
     "elementwise"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled blocks (inductor)"),
    ("triton_poi_fused_mul_silu_1", "compiled blocks (inductor)"),
    ("some_new_kernel", "other"),
])
def test_kernel_kind(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_scale_accum_cases_compare_the_same_tokens_per_step():
    import argparse

    from bench.scale import SHAPES, case_specs

    args = argparse.Namespace(accum_preset="llama-130m", accum=4, repeats=1)
    batch, seq = SHAPES["llama-130m"]
    for case, optimizer in (("accum", "poetx"), ("accum-adamw", "adamw")):
        one, accumulated = case_specs(case, args)
        assert one["optimizer"] == accumulated["optimizer"] == optimizer
        assert one["batch"] == batch and one.get("grad_accum", 1) == 1
        assert accumulated["batch"] * accumulated["grad_accum"] == batch


def test_scale_accum_repeats_alternate_and_compare_medians():
    import argparse

    from bench.scale import case_specs, summarize

    args = argparse.Namespace(accum_preset="llama-130m", accum=4, repeats=3)
    specs = case_specs("accum", args)
    assert [s.get("grad_accum", 1) for s in specs] == [1, 4, 1, 4, 1, 4]
    assert [s["repeat"] for s in specs] == [0, 0, 1, 1, 2, 2]
    speeds = [100.0, 90.0, 110.0, 95.0, 80.0, 99.0]  # one batch 80/100/110, accumulated 90/95/99
    rows = [{"tokens_per_s": v} for v in speeds]
    summarize("accum", rows)
    assert rows[-1]["ratio"] == 95.0 / 100.0
    assert rows[-1]["tokens_per_s_repeats"] == {"one": [100.0, 110.0, 80.0],
                                                "accum": [90.0, 95.0, 99.0]}
    pair = [{"tokens_per_s": 100.0}, {"tokens_per_s": 97.0}]
    summarize("accum", pair)  # one repeat: the two runs' ratio, as before
    assert pair[1]["ratio"] == 0.97


def test_top_ops_names_the_costly_ops_with_shapes_and_callers():
    import torch

    from bench.step import top_ops

    def concatenate(parts):
        return torch.cat(parts)

    def step(batch):
        parts = [batch * 2.0 for _ in range(8)]
        for _ in range(20):
            concatenate(parts)
        return batch.sum()

    rows = top_ops(step, torch.randn(256, 512), frames=6)
    by_op = {r["op"]: r for r in rows}
    assert rows == sorted(rows, key=lambda r: -r["ms"])
    cat = by_op["aten::cat"]  # (the profiler records no shapes for a list of tensors)
    assert cat["calls"] == 20
    assert any("concatenate" in frame for frame in cat["stack"])
    assert by_op["aten::mul"]["calls"] == 8 and "256, 512" in by_op["aten::mul"]["shapes"]


def test_top_ops_of_a_poetx_step_name_its_forward_and_backward_callers():
    import torch

    import poetx
    from bench.model import make_train_step
    from bench.step import top_ops
    from tests.tiny_llama import wrapped_llama

    model = wrapped_llama(poetx.POETConfig(block_size=16), dtype=torch.float32)
    batch = torch.randint(0, 61, (2, 17))
    step = make_train_step(model, poetx.make_optimizer(model, lr=1e-4, poet_lr=1e-4), batch, 0,
                           capture=False, compile_blocks=False)
    step(batch)
    rows = top_ops(step, batch, count=200)
    frames = [f for r in rows for f in r["stack"]]
    assert any("poetx/" in f for f in frames)
    assert any(f.startswith("autograd::engine::evaluate_function") for f in frames)
