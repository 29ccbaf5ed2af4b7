#!/usr/bin/env bash
# Create .venv (if missing) and install accel with every plugin of this checkout, editable:
# changes to core/, cli/ and plugins/*/src take effect without reinstalling.
# Usage: bash scripts/install.sh [extra requirement files...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first, from the CPU wheel; everything else under the constraints file, so that no
# package can drag in a CUDA build of torch.
"${PIP[@]}" install "torch==2.13.0"
PLUGINS=()
for dir in plugins/*/ bench/; do
    PLUGINS+=(-e "$dir")
done
"${PIP[@]}" install -c requirements/constraints.txt -e ".[all]" "${PLUGINS[@]}" "$@"
