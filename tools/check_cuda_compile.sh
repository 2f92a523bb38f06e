#!/usr/bin/env bash
# Compile-checks every CUDA source of the project for Hopper (sm_90a) without a GPU:
#   each csrc/**/*.cu with nvcc -c, against the CUTLASS headers of the nvidia-cutlass pip package
#   (and torch's headers, for sources that include them), in parallel;
#   each csrc/cuda/*.cpp (torch bindings) with the host compiler, syntax only.
# Exits 0 with a skip message where nvcc is absent; non-zero on any compile error.
# Env: JOBS (parallel compiles, default: number of cores), NVCC (default: nvcc on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: SKIP (nvcc not found on PATH)"
  exit 0
fi
PY=${PYTHON:-python}
CUTLASS=$("$PY" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))' 2>/dev/null) || {
  echo "check_cuda_compile: FAIL (python package nvidia-cutlass not importable: pip install nvidia-cutlass)"; exit 1; }
TORCH_INC=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null || true)
CUDA_INC=""  # for the host compiler: where cuda_runtime_api.h lives
for d in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [[ -f "$d/cuda_runtime_api.h" ]]; then CUDA_INC=$d; break; fi
done
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
JOBS=${JOBS:-$(nproc)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

mapfile -t CU < <(find csrc -name '*.cu' | sort)
mapfile -t CPP < <(find csrc/cuda -name '*.cpp' 2>/dev/null | sort)
echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
echo "check_cuda_compile: ${#CU[@]} .cu and ${#CPP[@]} binding .cpp files, $JOBS jobs, CUTLASS at $CUTLASS"

compile_one() {  # $1: source file; writes $OUT/<n>.log and $OUT/<n>.rc
  local src=$1 tag; tag=$(echo "$src" | tr '/.' '__')
  local start=$SECONDS
  if [[ $src == *.cu ]]; then
    "$NVCC" -c "$src" -o "$OUT/$tag.o" -std=c++17 -O3 \
      -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr --expt-extended-lambda \
      -DNDEBUG -I csrc -I csrc/cuda -I "$CUTLASS/include" -I "$CUTLASS/tools/util/include" $TORCH_INC \
      >"$OUT/$tag.log" 2>&1
  else
    ${CXX:-g++} -fsyntax-only -std=c++17 "$src" -I csrc -I csrc/cuda -I "$CUDA_INC" -I "$PY_INC" $TORCH_INC \
      -DTORCH_EXTENSION_NAME=_cuda >"$OUT/$tag.log" 2>&1
  fi
  echo $? >"$OUT/$tag.rc"
  echo "  $src: $([[ $(cat "$OUT/$tag.rc") == 0 ]] && echo ok || echo FAILED) ($((SECONDS - start)) s)"
}

start=$SECONDS
running=0
for src in "${CU[@]}" "${CPP[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n; running=$((running - 1)); fi
done
wait

failed=0
for src in "${CU[@]}" "${CPP[@]}"; do
  tag=$(echo "$src" | tr '/.' '__')
  if [[ $(cat "$OUT/$tag.rc" 2>/dev/null) != 0 ]]; then
    failed=$((failed + 1))
    echo "---- $src ----"; grep -m 20 -i "error" "$OUT/$tag.log" | cut -c1-400
  fi
done
echo "check_cuda_compile: $(( ${#CU[@]} + ${#CPP[@]} - failed )) ok, $failed failed, $((SECONDS - start)) s"
exit $(( failed > 0 ))
