#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script to run from the project root on a GPU machine.
#
#   bash benchmarks/gpu_checks.sh tests                 # CUDA-path test files (~1 min on an H100)
#   bash benchmarks/gpu_checks.sh suite                 # the whole test suite on the GPU machine
#   bash benchmarks/gpu_checks.sh bench [BASELINE_DIR] [ROWS...]
#
# `bench` runs `benchmarks/gpu_throughput.py` (default rows: dense vlm pages). With BASELINE_DIR (a copy of an
# earlier version's `src/` and `benchmarks/`, e.g. `git archive <commit> src benchmarks | tar -x -C .baseline`) it
# runs the baseline and this version alternately, twice each (baseline, current, baseline, current), in the same
# command on the same machine: host speed differs between machine starts, so only pairs from one run compare.
# It exits non-zero when any of the four runs fails (a broken baseline too).
#
# Every log goes to $OUT (the device tool's output folder) or ./gpu-checks. Failures are logged with full
# tracebacks (`--tb=long -rfE`), so a flaky failure leaves its message behind. Each section fits the device tool's
# 10-minute limit per command; run them as separate commands. Nothing here runs in CI (CI has no GPU).
set -uo pipefail
out="${OUT:-gpu-checks}"
mkdir -p "$out"
section="${1:-}"
shift || true

python3 - <<'EOF' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF

xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n "$(($(nproc) < 12 ? $(nproc) : 12))")
ignore=()
python3 -c "import pytrec_eval" 2>/dev/null || ignore=(--ignore tests/test_evaluation_metrics.py)

case "$section" in
  tests)
    python3 -m pytest -q "${xdist[@]}" -rfEs --tb=long -p no:cacheprovider \
      tests/test_dense_backend.py tests/test_fused_ops.py tests/test_cuda_paths.py tests/test_varlen_attention.py \
      tests/test_vlm_ranker_pipeline.py 2>&1 | tee "$out/cuda_tests.log"
    ;;
  suite)
    python3 -m pytest -q "${xdist[@]}" -rfE --tb=long -p no:cacheprovider "${ignore[@]}" tests \
      2>&1 | tee "$out/suite.log"
    ;;
  bench)
    baseline=""
    if [[ $# -gt 0 && -d "$1" ]]; then
      baseline="$1"
      shift
    elif [[ $# -gt 0 && "$1" == */* ]]; then  # rows are plain names: a path that is not a folder is a typo
      echo "gpu_checks.sh bench: baseline folder $1 does not exist" >&2
      exit 2
    fi
    rows=("$@")
    [[ ${#rows[@]} -gt 0 ]] || rows=(dense vlm pages)
    run_bench() {  # $1: label, $2: source root (holding src/ and benchmarks/)
      echo "== $1 ($2)" | tee -a "$out/bench.log"
      PYTHONPATH="$2/src${PYTHONPATH:+:$PYTHONPATH}" python3 "$2/benchmarks/gpu_throughput.py" --only "${rows[@]}" \
        2>&1 | grep -v -e "it/s]" -e "s/it]" | tee -a "$out/bench.log"
    }
    status=0  # any failed run fails the command (the loop alone returns only the last run's status)
    for round in 1 2; do
      if [[ -n "$baseline" ]]; then
        run_bench "baseline, round $round" "$baseline" || status=$?
      fi
      run_bench "current, round $round" "$PWD" || status=$?
    done
    exit "$status"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_checks.sh tests | suite | bench [BASELINE_DIR] [ROWS...]" >&2
    exit 2
    ;;
esac
