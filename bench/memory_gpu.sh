#!/usr/bin/env bash
# Issue 13 measurement, one device call on 2 GPUs side by side: peak memory and tokens/s of
# the memory options (bench/model.py rows); the planner is compared with them afterwards, on
# any machine: python -m bench.plan_check --measured bench/results/memory_options.json
# torchao is not installed on the GPU machine: its pure-Python optimizers travel in _vendor/.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/_vendor PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torchao.optim, torch; print('torchao', torchao.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
run() {  # GPU, model, seq, method, per-method timeout (s)
  CUDA_VISIBLE_DEVICES=$1 python3 -m bench.model --models "$2" --seqs "$3" --methods "$4" \
    --warmup 2 --steps 3 --timeout "$5" --out "$OUT/$2_$3_$4.json" > "/tmp/$2_$3_$4.txt" 2>&1
  { echo "== GPU $1 $2 $3 $4"; cat "/tmp/$2_$3_$4.txt"; } >> "$OUT/log_gpu$1.txt"
}
( run 0 llama-8b 1024 mem-ckpt-lean 115; run 0 llama-13b 2048 mem-ckpt-lean 120
  run 0 llama-8b 1024 mem-ckpt-8bit-inbwd 50 ) &
( run 1 llama-8b 1024 int8-lean 115; run 1 llama-8b 1024 mem-ckpt 85
  run 1 llama-8b 1024 int8 85 ) &
wait
grep -h "^llama" "$OUT"/log_gpu*.txt
