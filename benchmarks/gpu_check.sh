#!/usr/bin/env bash
# The whole GPU check in one call: the full-size parity suite for 3.3-2b (bf16 and float32, a 30 s clip alone and in
# a mixed batch; the 8b half is `pytest -m gpu parity/` without -k) and the side-by-side benchmark of 3.3-2b bf16,
# eager and compiled; under 8 minutes on one H100 / H200 (timeouts below). Everything it measures lands in OUT:
#   suite.xml / suite.log     the parity suite (JUnit XML, pytest output with the per-layer failures if any)
#   bench/bench.md, .json     the benchmark table (what BENCHMARKS.md's GPU table is copied from)
#   nvidia-smi.txt, times.txt the device and how long each part took
#
# Usage (from the repository root):
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--variant 3.3-2b|tiny] [--wheels DIR] [OUT]
# --wheels DIR installs the packages the GPU image lacks from DIR (made by benchmarks/gpu_wheels.sh on a machine with
# a package registry) with `pip install --no-index` into a private folder, and runs the project from this checkout:
# the lent GPU machines reach no registry. --device cpu --variant tiny runs every line of the check but the CUDA calls
# on a CPU machine; CI does that on each change (with wheels for its own Python), so the script cannot rot unseen.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda VARIANT=3.3-2b WHEELS="" OUT=gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --variant) VARIANT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1; see --help" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -n "$WHEELS" ]; then
  ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "gpu_check: no wheels in $WHEELS; make them with benchmarks/gpu_wheels.sh" >&2; exit 2; }
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: the offline install from $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PLUGIN=(-p parity.plugin)  # not pip-installed here: the pytest plugin is loaded by name
  "$PY" -c "import fms, soundfile, peft, transformers, fms_granite_speech, parity.cli" \
    || { echo "gpu_check: the packages from $WHEELS do not import" >&2; exit 2; }
else
  PLUGIN=()
fi
if [ "${DEVICE%%:*}" = cuda ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; run it on a GPU machine (or --device cpu --variant tiny)" >&2
    exit 2
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  BENCH=(--dtype bfloat16 --clips 10 --new-tokens 64 --repeats 5 --warmup 3 --compile)
else
  echo "no GPU: --device $DEVICE" > "$OUT/nvidia-smi.txt"
  BENCH=(--dtype float32 --clips 3 --new-tokens 8 --repeats 1 --warmup 1 --no-parity)
fi
: > "$OUT/times.txt"
status=0

start=$(date +%s)
timeout 270 "$PY" -m pytest "${PLUGIN[@]}" -m gpu parity/tests/test_gpu_suite.py -p no:cacheprovider -q \
  --gpu-suite-device "$DEVICE" --gpu-suite-variants "$VARIANT" --junitxml "$OUT/suite.xml" > "$OUT/suite.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
echo "suite $VARIANT on $DEVICE: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"

start=$(date +%s)
timeout 180 "$PY" benchmarks/bench.py --variant "$VARIANT" --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
echo "bench $VARIANT on $DEVICE: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
tail -n 5 "$OUT/suite.log"
cat "$OUT/bench/bench.md" 2>/dev/null || tail -n 20 "$OUT/bench.log"
exit $status
