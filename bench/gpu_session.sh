#!/usr/bin/env bash
# The GPU work, in stages that each fit in 10 minutes (one device-tool call each).
#
#   bash bench/gpu_session.sh test    # build, `pyens info`, `pyens selftest --device cuda`, `pytest -m cuda`
#   bash bench/gpu_session.sh bench   # build, quick selftest, python -m bench --device cuda --skip train
#                                     # (kernel suites, the Table 6 cost table)
#   bash bench/gpu_session.sh train   # MAT at the paper's MNIST setting on the embedded data, then eval
#
# A 15-minute device session runs `test` then `bench`. Every stage runs the selftest right
# after the build and stops there if it fails: no test, benchmark or training runs on kernels
# that compute wrong values (the selftest's table says which case failed).
#
# Expected durations (estimates: the script has not run on a GPU yet; the build time is scaled
# from nvcc here, ~45 s of CPU per .cu file):
#   build        2-3 min (MAX_JOBS=16; skipped when the CUDA extension is already built)
#   selftest     1-3 min the first time (Triton compiles ~50 kernel specialisations, then
#                caches them), seconds after that
#   pytest -m cuda  2-4 min (the Triton rows of 32769-65536 values compile slowly)
#   => test: 5-10 min
#   bench        kernel suites + cost table: 4-6 min  => bench: 5-7 min (with a built extension)
#   train        TRAIN_SECONDS (480 s) + eval
# Each stage builds first if the extension is missing, so the stages also work on a fresh
# machine. Each stage's logs and results go to one archive, $OUT/<stage>.tar.gz ($OUT is the
# device tool's folder, which returns at most 8 files; /tmp/pyens-gpu otherwise). `train`
# leaves the run in runs/gpu-paper-mat and resumes it from its checkpoint when called again on
# the same (warm) machine. Copy the JSONs into
# bench/results/ and refresh the README with `python -m bench --skip kernels,cost,train`.
#
# The device image has its own torch (not 2.13.0) and no network: install with --no-deps,
# against the torch that is there. Budget: docs/performance.md, "When a GPU is available".
set -uo pipefail
stage=${1:-test}
case "$stage" in test|bench|train) ;; *) echo "usage: bash bench/gpu_session.sh test|bench|train" >&2; exit 2;; esac
OUT=${OUT:-/tmp/pyens-gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
RES=$(mktemp -d)  # this stage's files; archived into $OUT on exit, whatever happened
mkdir -p "$OUT"
trap 'tar czf "$OUT/$stage.tar.gz" -C "$RES" . ; echo "archived: $OUT/$stage.tar.gz"' EXIT

say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

has_cuda_ops() {
    "$PY" -c "import sys; from pyens.ops.dispatch import build_info; sys.exit(0 if build_info().get('cuda') else 1)" 2>/dev/null
}

selftest() {  # stops the stage (exit 1) when any case fails
    say "pyens selftest --device cuda $*"
    "$PY" -m pyens selftest --device cuda "$@" 2>&1 | tee "$RES/selftest$*.txt"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        echo "selftest failed: the table above names the cases; stopping before anything else runs" >&2
        exit 1
    fi
}

build() {
    has_cuda_ops && return 0
    say "build (CUDA extension)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RES/gpu.txt"
    MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -30
    has_cuda_ops && return 0
    "$PY" -c "from pyens.ops.dispatch import build_info; print('no CUDA kernels:', build_info())" >&2
    return 1
}

case "$stage" in
  test)
    build || exit 1
    say "pyens info"
    "$PY" -m pyens info -v | tee "$RES/info.txt"
    selftest
    say "CUDA and Triton tests"
    "$PY" -m pytest -q -p no:cacheprovider -x -m cuda tests 2>&1 | tee "$RES/test-cuda.log" | tail -40
    ;;
  bench)
    build || exit 1
    selftest --quick
    say "benchmarks on cuda"
    "$PY" -m bench --device cuda --skip train --results "$RES" --readme "$RES/README.md" --threads 0 2>&1 \
        | tee "$RES/bench.log" | tail -60
    ;;
  train)
    build || exit 1
    selftest --quick
    run=runs/gpu-paper-mat
    resume=()
    [ -f "$run/checkpoint.pt" ] && resume=(--resume)
    say "MAT, configs/mnist-paper.toml, embedded MNIST ${resume[*]}"
    # leave a minute for the table; a cut-off run resumes from its last checkpoint next call
    timeout "${TRAIN_SECONDS:-480}" "$PY" -m pyens train --config mnist-paper --out "$run" --device cuda \
        --no-eval --no-progress "${resume[@]}" 2>&1 | tee "$RES/train.log" | tail -20
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then
        say "eval"
        "$PY" -m pyens eval "$run" --device cuda --markdown "$RES/eval.md" 2>&1 | tail -20
        cp "$run"/{metrics.jsonl,config.toml,eval.json} "$RES/" 2>/dev/null
    else
        echo "training stopped before its end; call the stage again to resume from the checkpoint"
    fi
    ;;
esac
