#!/usr/bin/env bash
# `make sanitize`: the C++ kernels (csrc/*.cpp) under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# 1. Copies this tree (tracked files and untracked ones git does not ignore, so uncommitted
#    edits are included) to $PYENS_SANITIZE_DIR/src, default /tmp/pyens-sanitize/src. The
#    extension built in this checkout is never touched; the copy's build/ is kept between runs,
#    so a rerun recompiles only what changed.
# 2. Builds pyens._C there with PYENS_SANITIZE=address,undefined (setup.py / CMakeLists.txt:
#    -fsanitize=..., -O1 -g, frame pointers; CPU kernels only, PYENS_CUDA=0).
# 3. Runs the tests that call pyens._C from the copy, with the sanitizer runtimes preloaded
#    into Python: the op tests and hypothesis properties of lp_step and mahalanobis and the
#    kernel edge cases. Triton cases are deselected (they do not reach the C++ code), so every
#    op call runs on the cpu backend (checked before the run) or on the reference.
#
# A report halts Python. pytest runs with --capture=sys, so that a report, written straight to
# file descriptor 2, is not lost in pytest's capture of it; the output is kept in
# $PYENS_SANITIZE_DIR/pytest.log. Exit status: 0 only when the tests pass and the output holds
# no sanitizer report. Extra arguments go to pytest, e.g. `tools/sanitize.sh -x -k l1`.
# Environment: PYTHON (default python), MAX_JOBS (default 1), PYENS_SANITIZE (default
# address,undefined), PYENS_SANITIZE_TESTS (the test files), CXX (the compiler, default c++).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="${PYENS_SANITIZE_DIR:-${TMPDIR:-/tmp}/pyens-sanitize}"
SRC="$WORK/src"
LOG="$WORK/pytest.log"
export PYENS_SANITIZE="${PYENS_SANITIZE:-address,undefined}"
export MAX_JOBS="${MAX_JOBS:-1}"
TESTS="${PYENS_SANITIZE_TESTS:-tests/test_lp_step.py tests/test_mahalanobis.py tests/test_kernel_edges.py}"
start=$SECONDS

# --- 1. the copy (timestamps kept, so that the incremental build sees what really changed)
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) | "$PYTHON" -c '
import os, shutil, sys
root, dst = sys.argv[1], sys.argv[2]
for rel in sys.stdin.read().split("\0"):
    src = os.path.join(root, rel)
    if rel and os.path.isfile(src):  # skips files deleted but not yet committed
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))
' "$ROOT" "$SRC"

# --- 2. the sanitized build
cd "$SRC"
echo "sanitize: building pyens._C with -fsanitize=$PYENS_SANITIZE in $SRC (MAX_JOBS=$MAX_JOBS)"
PYENS_CUDA=0 "$PYTHON" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log"
  echo "sanitize: the build failed (full log: $WORK/build.log)"
  exit 1
}
SO="$(ls pyens/_C*.so)"
for san in ${PYENS_SANITIZE//,/ }; do
  lib="$([ "$san" = address ] && echo asan || echo ubsan)"
  readelf -d "$SO" | grep -q "lib$lib\.so" || { echo "sanitize: $SO is not linked with lib$lib"; exit 1; }
done
echo "sanitize: built in $((SECONDS - start)) s"

# --- 3. the tests, with the runtimes preloaded (ASan must come first in the process)
CXX="${CXX:-c++}"
PRELOAD=""
case ",$PYENS_SANITIZE," in *,address,*) PRELOAD="$("$CXX" -print-file-name=libasan.so)" ;; esac
case ",$PYENS_SANITIZE," in *,undefined,*) PRELOAD="$PRELOAD $("$CXX" -print-file-name=libubsan.so)" ;; esac
for lib in $PRELOAD; do [ -f "$lib" ] || { echo "sanitize: runtime $lib not found (CXX=$CXX)"; exit 1; }; done
run() {
  # PYTHONPATH: the copy's pyens, not the installed (or editable) one
  env PYTHONPATH="$SRC" LD_PRELOAD="$PRELOAD" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    PYENS_REQUIRE_BACKENDS=cpu "$PYTHON" "$@"
}
# Python leaks by design (detect_leaks=0); a report halts the process (halt_on_error=1).
run - <<'EOF'
import pyens, pyens.ops
from pyens.ops.dispatch import compiled_extension
mod, why = compiled_extension()
assert mod is not None, why
assert pyens.__file__.startswith(__import__("os").getcwd()), f"imported {pyens.__file__}, not the copy's"
for op in ("lp_step", "mahalanobis"):
    chosen = pyens.ops.backends()[op]["cpu"]["selected"]
    assert chosen == "cpu", f"{op}: the automatic choice on the CPU is {chosen}, not the sanitized cpu backend"
print(f"sanitize: {mod.__file__} loaded; lp_step and mahalanobis run on the cpu backend")
EOF
status=0
# (log_path= in ASAN_OPTIONS/UBSAN_OPTIONS is no way around the capture: GCC 12's UBSan runtime
# ignores it when ASan is loaded too, and writes to stderr)
run -m pytest -q -p no:cacheprovider --capture=sys $TESTS -k "not triton" "$@" 2>&1 | tee "$LOG" || status=$?
reports="$(grep -cE "runtime error:|ERROR: (AddressSanitizer|LeakSanitizer)|SUMMARY: [A-Za-z]*Sanitizer" "$LOG" || true)"
if [ "$reports" != 0 ]; then
  grep -nE "runtime error:|ERROR: (AddressSanitizer|LeakSanitizer)|SUMMARY: [A-Za-z]*Sanitizer" "$LOG" | head -n 20
  echo "sanitize: $reports sanitizer report line(s), full output in $LOG"
  status=1
else
  echo "sanitize: no sanitizer reports (output in $LOG)"
fi
echo "sanitize: pytest exit status ${status}, $((SECONDS - start)) s in all"
exit $status
