#!/usr/bin/env bash
# The whole GPU check on one H100 / H200, in under 8 minutes: the full-size parity suite for 3.3-2b (bf16 and float32,
# a 30 s clip alone and in a mixed batch; the 8b half of the suite is `pytest -m gpu parity/` without -k) and the
# side-by-side benchmark of 3.3-2b bf16, eager and compiled. Everything it measures lands in OUT (default gpu-check/):
#   suite.xml / suite.log     the parity suite (JUnit XML, pytest output with the per-layer failures if any)
#   bench/bench.md, .json     the benchmark table (what BENCHMARKS.md's GPU table is copied from)
#   nvidia-smi.txt, times.txt the device and how long each part took
# Usage: bash benchmarks/gpu_check.sh [OUT]     (from the repository root, after `pip install -e ".[test]"`)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; run it on a GPU machine" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
: > "$OUT/times.txt"
status=0

start=$(date +%s)
timeout 270 pytest -m gpu parity/tests/test_gpu_suite.py -k "3.3-2b" -p no:cacheprovider -q \
  --junitxml "$OUT/suite.xml" > "$OUT/suite.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
echo "suite 3.3-2b: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"

start=$(date +%s)
timeout 180 python benchmarks/bench.py --variant 3.3-2b --device cuda --dtype bfloat16 --clips 10 \
  --new-tokens 64 --repeats 5 --warmup 3 --compile --out "$OUT/bench" > "$OUT/bench.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
echo "bench 3.3-2b bf16: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
tail -n 5 "$OUT/suite.log"
cat "$OUT/bench/bench.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"
exit $status
