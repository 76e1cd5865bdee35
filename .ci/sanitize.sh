#!/usr/bin/env bash
# The CPU extension built with AddressSanitizer + UndefinedBehaviorSanitizer, and
# the op tests run against it (C++ backend and references; Triton and CUDA are out
# of scope here: neither runs through the instrumented code).
#
#   bash .ci/sanitize.sh [pytest args...]     (after `make env`; uses .venv)
#
# The instrumented library is built in build/asan and run from a copy of the
# package there, so the regular in-place build is neither used nor touched.
# Python and torch themselves are not instrumented: libasan is preloaded so its
# allocator is in place before the interpreter starts, leak checking is off (the
# interpreter's own allocations at exit are not ours to report), and any ASan or
# UBSan finding aborts the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$PWD/.venv/bin/python}"
OUT=build/asan

mkdir -p "$OUT"
RLKERNELS_SANITIZE=address,undefined RLKERNELS_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; exit 1; }
rm -rf "$OUT/tree" && mkdir -p "$OUT/tree"
cp -r rlkernels tests benchmarks python docs pyproject.toml README.md SECURITY.md "$OUT/tree/"
rm -f "$OUT"/tree/rlkernels/_C*.so
cp "$OUT"/lib/rlkernels/_C*.so "$OUT/tree/rlkernels/"
symbols="$(nm -D "$OUT"/tree/rlkernels/_C*.so)"  # (not piped into grep -q: SIGPIPE under pipefail)
if [[ "$symbols" != *__asan_report_load* || "$symbols" != *__ubsan_handle* ]]; then
  echo "build/asan: the library is not instrumented"; exit 1
fi

# libstdc++ is preloaded too: python itself does not link it, and ASan resolves
# its __cxa_throw interceptor at start-up (without it, any C++ exception aborts).
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
cd "$OUT/tree"
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TRITON_INTERPRET=0 RLK_SANITIZED=1
"$PY" - <<'EOF'
import rlkernels, os
so = rlkernels._C.__file__
assert so.startswith(os.getcwd()), f"imported {so}, not the sanitizer build"
print("sanitizer build:", so)
EOF
# The op tests and the multi-process averaging tests. Left out: trainers, CLI,
# examples and integrations (they call the same ops at larger sizes, and would
# take most of an hour instrumented), and the GPU-check and Triton-compile tests
# (scripts and Triton's compiler, no C++ kernel of ours).
"$PY" -m pytest tests -q -p no:cacheprovider -x \
  --ignore-glob='tests/test_trainers_*' --ignore=tests/test_cli.py --ignore=tests/test_examples.py \
  --ignore=tests/test_gpu_check.py --ignore=tests/test_triton_gpu_semantics.py \
  --ignore-glob='tests/test_integrations*' "$@"
