#!/usr/bin/env bash
# The build step of tools/gpu_check.sh: the package with its C++ core first (so every later step
# has it), then the CUDA extension (CUTLASS grouped GEMM for sm_90a) when the CUTLASS headers are
# importable (the nvidia-cutlass wheel carried in .whl/), else one line saying it was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
t0=$SECONDS
DUALPIPE_EXT_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || exit 1
echo "core: built in $((SECONDS - t0)) s"
if ! "$PY" -c "import cutlass_library" 2>/dev/null; then
  echo "CUDA extension: skipped (no CUTLASS headers: carry the nvidia-cutlass wheel in .whl/)"
  exit 0
fi
t1=$SECONDS
if DUALPIPE_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . > /tmp/gpu_build_cuda.log 2>&1; then
  echo "CUDA extension: built in $((SECONDS - t1)) s"
  "$PY" -c "import torch, dualpipe_ext._cuda as c; print('dualpipe_ext._cuda:', c.__file__)"
else
  echo "CUDA extension: build FAILED after $((SECONDS - t1)) s (the core stays installed):"
  grep -iE "error" /tmp/gpu_build_cuda.log | head -n 12 | cut -c1-300
  DUALPIPE_EXT_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e . > /dev/null 2>&1
  exit 1
fi
