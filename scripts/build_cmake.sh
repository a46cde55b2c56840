#!/usr/bin/env bash
# Configure + build CMakeLists.txt once (the operator library libdpo_fast_ops.so, no pybind part),
# in a temporary build directory with Ninja, then load it in Python and call both operators.
#
# Env: BUILD_DIR   build directory (default: a fresh mktemp -d, removed at the end unless KEEP=1)
#      MAX_JOBS    parallel jobs (default 2)
#      CMAKE_ARGS  extra configure arguments, e.g. "-DDPO_FAST_CUDA=ON -DDPO_FAST_CPU_CAPABILITY=avx2"
set -euo pipefail

cd "$(dirname "$0")/.."
SRC="$(pwd)"
PY="${PYTHON:-python}"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
if [ -n "${BUILD_DIR:-}" ]; then
  BUILD="$BUILD_DIR"
  mkdir -p "$BUILD"
else
  BUILD="$(mktemp -d -t dpo_fast_cmake.XXXXXX)"
  if [ "${KEEP:-0}" != "1" ]; then trap 'rm -rf "$BUILD"' EXIT; fi
fi
echo "build_cmake: build dir $BUILD"

GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" ${CMAKE_ARGS:-}
cmake --build "$BUILD" --parallel "${MAX_JOBS:-2}"

LIB="$(find "$BUILD" -maxdepth 2 -name 'libdpo_fast_ops*.so' | head -n 1)"
if [ -z "$LIB" ]; then
  echo "build_cmake: libdpo_fast_ops.so not produced" >&2
  exit 1
fi
echo "build_cmake: built $LIB"

# Smoke test: the library registers the ops and they run (CPU).
"$PY" - "$LIB" <<'PYEOF'
import sys
import torch
torch.ops.load_library(sys.argv[1])
x = torch.randn(2, 3, 37)
t = torch.tensor([[0, 5, -100], [36, 1, 2]])
lse, tl, ls = torch.ops.dpo_fast_C.token_stats(x, t)
ref = torch.logsumexp(x.double(), -1)
assert torch.allclose(lse[t >= 0].double(), ref[t >= 0], atol=1e-5), "lse mismatch"
assert lse[0, 2] == 0
g = torch.empty_like(x)
torch.ops.dpo_fast_C.token_grad(x, t, lse, torch.ones(2, 3), g)
assert torch.isfinite(g).all() and not g[0, 2].any()
print("build_cmake: smoke test ok")
PYEOF
