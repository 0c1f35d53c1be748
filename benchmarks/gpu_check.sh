#!/usr/bin/env bash
# knowbench on a lent GPU (issue 17): one prepared script, well under the device tool's 10 minutes.
#
#   1. install knowbench (pip install --no-deps -e .; pydantic & co. from .whl/ when missing)
#   2. nvidia-smi, torch / CUDA / transformers / accelerate versions
#   3. the main job on the GPU: knowbench run --editor rome --task zsre --sequential 20 --device cuda
#      (the embedded model) -> $OUT/main_cuda.json
#   4. ROME / MEMIT / AlphaEdit timings on a GPT-2 XL-shaped random model built on the GPU, float32
#   5. a ~100M model spread over cuda:0 and the CPU (load_model(device="auto", max_memory=...)),
#      one edit per weight editor, each checked on its weight's own device
#   6. the main job in bfloat16 -> $OUT/main_cuda_bf16.json;  7. the timings in bfloat16
#   8. $OUT/gpu_timings.json and a table (benchmarks/gpu_check.py report); the log in $OUT/gpu_check.log
#
# Every stage runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET (default 450 s), so a
# slow stage costs only itself. A dry run on a CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 (4 layers,
# width 128, 4 sequential edits). Through the device tool, from the repository root:
#   bash benchmarks/gpu_check.sh        (carry .whl if pydantic is missing there; see the readme)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
DEV=${GPU_CHECK_DEVICE:-cuda}
SMALL=${GPU_CHECK_SMALL:-0}
BUDGET=${GPU_CHECK_BUDGET:-450}
SEQ=20; [ "$SMALL" = 1 ] && SEQ=4
START=$(date +%s)
mkdir -p "$OUT"
export OUT GPU_CHECK_DEVICE=$DEV GPU_CHECK_SMALL=$SMALL PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
export KNOWBENCH_CACHE=${KNOWBENCH_CACHE:-$WORK/cache} GPU_CHECK_PARTS=$WORK/parts
mkdir -p "$GPU_CHECK_PARTS"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() {  # stage NAME CAP CMD...: CMD under timeout min(CAP, time left - 20 s), skipped below 20 s
  local name=$1 cap=$2 t t0 rc; shift 2
  t=$(( $(left) - 20 )); (( t > cap )) && t=$cap
  if (( t < 20 )); then
    echo "== $name: skipped (budget spent)"; echo "$name: skipped (budget)" >> "$GPU_CHECK_PARTS/stages"; return
  fi
  echo; echo "== $name (limit ${t}s, $(( $(date +%s) - START ))s in)"
  t0=$(date +%s)
  timeout -k 5 "$t" "$@"; rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (timed out)')" >> "$GPU_CHECK_PARTS/stages"
}

# 1. install (no network there: no build isolation, no dependencies)
if ! "$PY" -c "import knowbench.editors.rome" 2>/dev/null; then  # editors/ is knowbench.editors once installed
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  WHEELS=${GPU_CHECK_WHEELS:-.whl}
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pydantic is missing and no wheels in $WHEELS/: knowbench run will fail (see the readme)"
  fi
fi

# 2. the machine
[ "$DEV" != cpu ] && nvidia-smi
"$PY" - <<'EOF'
import torch, transformers, accelerate
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} "
      f"devices={torch.cuda.device_count()} transformers {transformers.__version__} accelerate {accelerate.__version__}")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

RUN=("$PY" -m knowbench run --editor rome --task zsre --sequential "$SEQ" --device "$DEV" --no-fluency)
stage "main job $DEV float32" 150 "${RUN[@]}" --output "$OUT/main_$DEV.json"
stage "timings float32" 150 "$PY" benchmarks/gpu_check.py timings --dtype float32
stage "spread over devices" 120 "$PY" benchmarks/gpu_check.py spread
stage "main job $DEV bfloat16" 100 "${RUN[@]}" --dtype bfloat16 --output "$OUT/main_${DEV}_bf16.json"
stage "timings bfloat16" 120 "$PY" benchmarks/gpu_check.py timings --dtype bfloat16
timeout 60 "$PY" benchmarks/gpu_check.py report
for f in "$OUT/main_$DEV.json" "$OUT/main_${DEV}_bf16.json"; do
  [ -f "$f" ] && "$PY" -c "
import json, sys; r = json.load(open(sys.argv[1])); m = r['metrics']['post']
print(sys.argv[1].split('/')[-1], r['model']['dtype'] if 'dtype' in r.get('model', {}) else '',
      {k: round(m[k]['value'], 2) for k in ('edit_succ', 'rephrase', 'locality') if k in m})" "$f"
done
echo "total $(( $(date +%s) - START ))s"
