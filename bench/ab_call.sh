#!/usr/bin/env bash
# One device call of this session's A/B, most important first, each stage only if the call's
# time (LIMIT seconds, default 560) leaves room for it: GPU tests of the changed kernels, the
# step on this tree, the authors' step, then the flagged variants and the tree before them.
set -uo pipefail
export PYTHONPATH=$PWD
LIMIT=${LIMIT:-560}
room() { [ $((LIMIT - SECONDS)) -gt "$1" ]; }
timeout 100 python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_capture.py \
  -k "persistent or fan or capture or inverse or gram_gpu or poet_linear_gpu" 2>&1 | tail -3 > "$OUT/gpu_tests.txt"
cat "$OUT/gpu_tests.txt"
STEP_TIMEOUT=110 bench/ab_step.sh "new=.:"
room 215 && STEP_TIMEOUT=$((LIMIT - SECONDS - 5)) METHODS=authors bench/ab_step.sh "authors=.:"
# the two with the most to gain first (saveall: every layer keeps its input permuted, ~4 GB)
for spec in "fused=.:POETX_ROTATE_GRAM=fused" "saveall=.:" "base=.stage/base:" \
            "mma=.:POETX_ROTATE_KERNEL=persistent-mma" "gram=.:POETX_GRAM_SPLITS=waves"; do
  method=poetx; [ "${spec%%=*}" = saveall ] && method=poetx-permsaveall
  room 65 && STEP_TIMEOUT=$((LIMIT - SECONDS - 5)) METHODS=$method bench/ab_step.sh "$spec"
done
