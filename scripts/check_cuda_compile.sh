#!/usr/bin/env bash
# Compile-check every CUDA source of the extension with plain nvcc (no torch, no GPU needed):
#   nvcc -std=c++17 -c FILE -Icsrc -arch=ARCH -o /dev/null   for ARCH in sm_90a sm_80
# then (best effort, on by default) a host-compiler syntax check of the CUDA torch glue
# csrc/cuda_glue.cpp against the installed torch's headers, which lack only the generated
# c10/cuda/impl/cuda_cmake_macros.h on a CPU-only torch (a stub is supplied).
# Exits non-zero if any check fails.
#
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#      CUDA_ARCHS (default "sm_90a sm_80")
#      CHECK_GLUE=0 to skip the glue syntax check (it needs python + torch and the CUDA headers)
set -u -o pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CUDA_ARCHS="${CUDA_ARCHS:-sm_90a sm_80}"
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC=...)" >&2
  exit 2
fi
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

mapfile -t FILES < <(find csrc -name '*.cu' | sort)
if [ "${#FILES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under csrc/" >&2
  exit 2
fi

fail=0
for f in "${FILES[@]}"; do
  for arch in $CUDA_ARCHS; do
    if "$NVCC" -std=c++17 -c "$f" -Icsrc -arch="$arch" -o /dev/null; then
      echo "  ok    $f ($arch)"
    else
      echo "  FAIL  $f ($arch)" >&2
      fail=1
    fi
  done
done

if [ "${CHECK_GLUE:-1}" != "0" ]; then
  TORCH_INC="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
  CUDA_INC=""
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC="$d/include"; break; fi
  done
  if [ -z "$TORCH_INC" ] || [ -z "$CUDA_INC" ]; then
    echo "check_cuda_compile: torch or CUDA headers not found; glue syntax check skipped" >&2
  else
    stub="$(mktemp -d)"
    trap 'rm -rf "$stub"' EXIT
    mkdir -p "$stub/c10/cuda/impl"
    if [ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    for f in csrc/cuda_glue.cpp; do
      if "${CXX:-c++}" -std=c++20 -fsyntax-only -DDPO_FAST_WITH_CUDA -Icsrc -I"$stub" -I"$TORCH_INC" \
          -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_INC" "$f"; then
        echo "  ok    $f (syntax, host compiler)"
      else
        echo "  FAIL  $f (syntax, host compiler)" >&2
        fail=1
      fi
    done
  fi
fi

if [ "$fail" -ne 0 ]; then
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
