#!/usr/bin/env bash
# One device call per stage: GPU tests, layer benchmark, largest model, model benchmark.
# Usage (repo root, on the GPU machine): bench/run_gpu.sh STAGE [STAGE...]; results go to $OUT.
# The bundled corpus travels in .cache/poetx (no network there).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 POETX_DATA_DIR=$PWD/.cache/poetx
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in "$@"; do
  case "$stage" in
    tests) timeout 200 python3 -m pytest -q -m gpu tests 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt" ;;
    layer) timeout 240 python3 -m bench.layer --out "$OUT/layer.json" --md "$OUT/layer.md" \
        2>&1 | tee "$OUT/layer.txt" | tail -45 ;;
    largest)  # llama-30b, 300 steps: about 9 minutes on an H100; metrics kept if stopped
      timeout "${LARGEST_TIMEOUT:-580}" python3 -m bench.largest --run-dir /tmp/largest \
        --out "$OUT/largest.json" > "$OUT/largest.txt" 2>&1
      cp /tmp/largest/metrics.jsonl /tmp/largest/config.json "$OUT/" ;;
    train60m)  # issue 6 GPU check and the int8/fp8 accuracy cost on a short real run
      for v in ${T60_VARIANTS:-poetx:auto adamw:auto poetx:int8 poetx:fp8}; do
        set -- ${v/:/ }
        python3 -m poetx.cli.main train --preset llama-60m --optimizer "$1" --w0-format "$2" \
          --steps "${STEPS60:-400}" --eval-every 200 --save-every 100000 --no-progress \
          --out "/tmp/run60m_$1_$2" 2>&1 | tail -6
        cp "/tmp/run60m_$1_$2/metrics.jsonl" "$OUT/metrics60m_$1_$2.jsonl"
      done ;;
    model-*) models=${stage#model-}
      timeout "${MODEL_TIMEOUT:-540}" python3 -m bench.model --models "$models" \
        --methods "${METHODS:-adamw,fast,mem-ckpt,int8,fp8}" --out "$OUT/model_${models//,/_}.json" \
        2>&1 | tee "$OUT/model_${models//,/_}.txt" | tail -40 ;;
    integrations) timeout 300 python3 -m bench.integrations --out "$OUT/integrations.json" 2>&1 \
        | grep -v "Writing model shards" | tee "$OUT/integrations.txt" | tail -12 ;;
    capture)  # whole-step capture and the kernels/loss it relies on
      timeout 300 python3 -m pytest -q -s -m gpu tests/test_capture.py tests/test_trainer.py \
        tests/test_kernels.py tests/test_lm_loss.py tests/test_cross_entropy_kernels.py 2>&1 | tail -25 | tee "$OUT/gpu_tests_capture.txt" ;;
    loss)  # chunked CE vs Liger's fused linear CE (wheel carried in .whl, see bench/loss.py)
      ls .whl/liger_kernel-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index \
        --no-deps --target /tmp/site .whl/liger_kernel-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
      timeout 200 python3 -m bench.loss --out "$OUT/loss.json" 2>&1 | tail -20 ;;
    step)  # the step table: CASES / METHODS / STEP_FLAGS pick a subset
      timeout "${STEP_TIMEOUT:-560}" python3 -m bench.step \
        --cases "${CASES:-llama-130m:16x512,llama-8b:1x1024,llama-8b:2x2048}" \
        --methods "${METHODS:-adamw,adamw-compile,poetx-eager,poetx,authors}" \
        --authors-path "${AUTHORS:-third_party}" ${STEP_FLAGS:-} --out "$OUT/${STEP_JSON:-step.json}" \
        2>&1 | tee "$OUT/step.txt" | tail -30 ;;
    accum)  # --grad-accum (K = 4) against one batch, poetx and AdamW, at the micro-batch
      # shapes of the older rows (8 x 256) and at ones that fill the GPU (32 x 256)
      preset=${ACCUM_PRESET:-llama-130m}
      for shape in ${ACCUM_SHAPES:-32x256 128x256}; do
        timeout "${ACCUM_TIMEOUT:-280}" python3 -m bench.scale --cases accum,accum-adamw \
          --accum-preset "$preset" --shape "$preset=$shape" \
          --out "$OUT/scale_accum_${preset}_$shape.json" 2>&1 | tail -8
      done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
