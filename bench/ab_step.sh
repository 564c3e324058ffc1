#!/usr/bin/env bash
# Alternating A/B of the Llama-8B 2 x 2048 step in processes of their own, one call:
#   bench/ab_step.sh "LABEL=TREE:ENV ..."   e.g.  "base=.stage/base: new=.:" "mma=.:POETX_ROTATE_KERNEL=persistent-mma"
# Each spec runs `bench.step` in TREE with the environment assignments ENV (comma-separated);
# the JSON rows go to $OUT/ab_LABEL_N.json, one tok/s line per run to stdout.
set -uo pipefail
OUT=${OUT:-/tmp/out}
ROOT=$PWD
n=0
for spec in "$@"; do
  n=$((n + 1))
  label=${spec%%=*}; rest=${spec#*=}; tree=${rest%%:*}; envs=${rest#*:}
  (cd "$tree" && env ${envs//,/ } PYTHONPATH="$PWD" timeout "${STEP_TIMEOUT:-150}" python3 -m bench.step \
     --cases "${CASES:-llama-8b:2x2048}" --methods "${METHODS:-poetx}" --authors-path "$ROOT/third_party" \
     ${STEP_FLAGS:-} --out "$OUT/ab_${label}_$n.json" 2>&1 | grep "tok/s" | sed "s/^/$label: /")
done
