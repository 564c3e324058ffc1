#!/usr/bin/env bash
# Issue 13 measurement, one device call on 2 GPUs side by side: peak memory and tokens/s of
# the memory options (bench/model.py rows), then the planner against them (bench/plan_check.py).
# torchao is not installed on the GPU machine: its pure-Python optimizers travel in _vendor/.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/_vendor PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torchao.optim, torch; print('torchao', torchao.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
run() {  # GPU, out name, model, seq, methods
  CUDA_VISIBLE_DEVICES=$1 timeout "${T:-270}" python3 -m bench.model --models "$3" --seqs "$4" \
    --methods "$5" --warmup 2 --steps 3 --timeout 150 --out "$OUT/$2.json" > "$OUT/$2.txt" 2>&1
}
( run 0 g0a llama-8b 1024 mem-ckpt-lean,mem-ckpt-8bit-inbwd; run 0 g0b llama-13b 2048 mem-ckpt-lean ) &
( run 1 g1a llama-8b 1024 int8-lean,mem-ckpt,int8 ) &
wait
tail -n 4 "$OUT"/*.txt
