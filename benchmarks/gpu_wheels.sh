#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the lent GPU machines lack, for
# `bash benchmarks/gpu_check.sh --wheels DIR` to install there with `pip install --no-index` (those machines reach no
# registry). Their image (Python 3.12, torch 2.11.0+cu130, transformers 5.17.0, safetensors, tokenizers, tabulate,
# hypothesis, matplotlib, pytest, pytest-xdist) has no ibm-fms and no soundfile (nor soundfile's cffi / pycparser);
# peft is pinned here too, since the image's version is not the project's pin. Versions are the ones installed in this
# environment (the pins of pyproject.toml), so both machines run the same code. About 3 MB in all.
# Usage: bash benchmarks/gpu_wheels.sh [DIR] [--python-version 3.12]   (DIR default: .whl, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.whl PYV=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=$2; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    -*) echo "gpu_wheels: unknown option $1; see --help" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$DIR"
PACKAGES=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("ibm-fms", "soundfile", "cffi", "pycparser", "peft")))
PYEOF
)
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" \
  -d "$DIR" $PACKAGES
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels for Python $PYV in $DIR ($(du -sh "$DIR" | cut -f1)): $PACKAGES"
