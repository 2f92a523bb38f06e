#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call: build, CUDA checks, benchmarks,
# the main job on the GPU, and a report. For a machine with an NVIDIA GPU, torch with CUDA,
# Triton and nvcc (no network needed: the CUTLASS headers come from an installed
# nvidia-cutlass, or from wheels in .whl/ when carried there).
#
#   bash tools/gpu_check.sh [OUT_DIR]        # default $OUT, else /tmp/dualpipe_ext_gpu
#
# Writes OUT_DIR/report.md (the tail of every step's output) and one log per step; exits with
# the number of steps that failed. Each step has its own time limit, so the whole call stays
# within about ten minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/dualpipe_ext_gpu}}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/report.md"
: > "$REPORT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run, keep the log, put its tail in the report
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local code=$?
  { echo "## $name (exit $code, $((SECONDS - t0)) s)"; echo '```'; tail -n 40 "$OUT_DIR/$name.log"; echo '```'; } >> "$REPORT"
  echo "$name: exit $code ($((SECONDS - t0)) s)"
  [ "$code" -eq 0 ] || failed=$((failed + 1))
}

step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")'"

if ls .whl/*.whl > /dev/null 2>&1; then
  step wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/dualpipe_ext_site .whl/*.whl
  export PYTHONPATH=/tmp/dualpipe_ext_site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package with its CUDA extension; without it when that build fails (reported)
step build 420 bash -c "DUALPIPE_EXT_CUDA=1 MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps -e . \
  || DUALPIPE_EXT_CUDA=0 $PY -m pip install -q --no-build-isolation --no-deps -e ."
step checks 300 $PY tools/gpu_checks.py --json "$OUT_DIR/checks.json"
step bench_moe_kernels 240 $PY bench/bench_moe_kernels.py
step bench_ep 300 $PY bench/bench_ep.py --gpu --sms 8 16 20 24 32
step bench_overlap 300 $PY bench/bench_overlap.py --gpu --quick
step main_job 300 $PY -m dualpipe_ext.demo --device cuda --schedule dualpipev --pp 1 --ep 1 --steps 20 --seq 128 --hidden 256
step main_job_epbuffer 300 $PY -m dualpipe_ext.demo --device cuda --schedule dualpipev --pp 1 --ep 1 --steps 20 --seq 128 \
  --hidden 256 --ep-path buffer --two-batch

echo "$failed step(s) failed; report: $REPORT"
exit "$failed"
