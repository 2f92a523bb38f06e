#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call of at most 540 s on one H200:
# build, the GPU correctness tests, the benchmarks, the main job on CUDA.
#
#   bash tools/gpu_check.sh [OUT_DIR]   # default $OUT, else /tmp/dualpipe_ext_gpu
#   bash tools/gpu_check.sh --plan      # each step with its limit, then "total N s"; runs nothing
#   bash tools/gpu_check.sh --only build,tests_gpu [OUT_DIR]   # just these steps (a second, shorter call)
#   bash tools/gpu_check.sh --wheels    # before the call, where there is a network: fill .whl/
#
# OUT_DIR receives three files: report.md (each step's status and the tail of its output),
# figures.json (every step's JSON figures, keyed by step) and logs.tar.gz (every step's full log).
# The script ends by printing the report and exits with the number of steps that failed.
# What the machine lacks travels in .whl/ (carried, ignored by git): the nvidia-cutlass wheel
# for the CUTLASS grouped GEMM; without it the CUDA extension's step says it was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

# name|limit_s|command (run with bash -c; $FIG is the step's JSON path, $PY the interpreter)
STEPS=(
  "environment|10|nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader; \$PY -c 'import torch, triton; p = torch.cuda.get_device_properties(0); print(torch.__version__, torch.version.cuda, triton.__version__, p.name, p.multi_processor_count, \"SMs\")'"
  "wheels|10|if ls .whl/*.whl >/dev/null 2>&1; then \$PY -m pip install -q --no-index --no-deps --no-compile --target \$SITE .whl/*.whl && ls \$SITE; else echo 'skipped: no .whl/ carried'; fi"
  "build|120|bash tools/gpu_build.sh"
  "tests_gpu|135|TRITON_INTERPRET=0 \$PY -m pytest -q -m gpu -k 'not float32' -p no:cacheprovider tests/gpu tests/kernels --junitxml=\$LOGS/tests_gpu.xml"
  "bench_ep|50|\$PY bench/bench_ep.py --gpu --quick --sms 8 16 20 24 32 66 132 --json \$FIG"
  "bench_moe_layer|60|\$PY bench/bench_moe_layer.py --quick --json \$FIG"
  "bench_graphs|30|\$PY bench/bench_graphs.py --quick --json \$FIG"
  "bench_grouped_mm|40|\$PY bench/bench_moe_kernels.py --quick --json \$FIG"
  "bench_fp8|15|\$PY bench/bench_fp8.py --json \$FIG"
  "bench_overlap|30|\$PY bench/bench_overlap.py --gpu --quick --json \$FIG"
  "main_job|40|\$PY -m dualpipe_ext.demo --device cuda --schedule dualpipev --pp 1 --ep 1 --steps 12 --seq 128 --hidden 256 --json \$FIG"
)
# The call's whole budget; a shorter one (GPU_CHECK_BUDGET_S) leaves the last steps "not run".
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}

if [ "${1:-}" = "--plan" ]; then
  total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit _ <<< "$s"
    printf '%-18s %4d s\n' "$name" "$limit"
    total=$((total + limit))
  done
  echo "total $total s"
  exit 0
fi

if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .whl && ${PYTHON:-python3} -m pip download -q --no-deps -d .whl nvidia-cutlass && ls -l .whl
  exit $?
fi

ONLY=""
if [ "${1:-}" = "--only" ]; then ONLY=",$2,"; shift 2; fi
OUT_DIR=${1:-${OUT:-/tmp/dualpipe_ext_gpu}}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
export LOGS=$WORK/logs SITE=/tmp/dualpipe_ext_site PYTHONUNBUFFERED=1
export PY=${PYTHON:-python3}
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$LOGS" "$WORK/figures"
REPORT=$OUT_DIR/report.md
{ echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; echo; } > "$REPORT"
failed=0
start=$SECONDS

for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$s"
  export FIG=$WORK/figures/$name.json
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then continue; fi
  left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -lt 5 ]; then
    echo "## $name: not run (the call's $BUDGET_S s were spent)" >> "$REPORT"
    failed=$((failed + 1))
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  timeout -k 5 "$limit" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  code=$?
  took=$((SECONDS - t0))
  status=ok
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then status="TIMEOUT after $limit s"; elif [ "$code" -ne 0 ]; then status="FAIL (exit $code)"; fi
  [ "$code" -eq 0 ] || failed=$((failed + 1))
  echo "$name: $status, $took s" >&2
  { echo "## $name: $status, $took s"; echo '```'; grep -v '^\s*$' "$LOGS/$name.log" | tail -n 30 | cut -c1-200; echo '```'; } >> "$REPORT"
done

$PY - "$WORK/figures" "$OUT_DIR/figures.json" <<'EOF' || echo "figures.json: could not be written" >> "$REPORT"
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
figures = {}
for name in sorted(os.listdir(src)):
    try:
        figures[name[:-5]] = json.load(open(os.path.join(src, name)))
    except ValueError as e:
        figures[name[:-5]] = {"error": f"unreadable JSON: {e}"}
json.dump(figures, open(dst, "w"), indent=1)
EOF
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" logs figures
echo "**$failed step(s) failed; $((SECONDS - start)) s in all.**" >> "$REPORT"
cat "$REPORT"
rm -rf "$WORK"
exit "$failed"
