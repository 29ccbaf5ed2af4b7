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
# torch first, the CPU build: a wheel pip already finds locally (--find-links in pip's config
# or PIP_FIND_LINKS), else PyTorch's CPU index (PyPI's Linux wheel is the CUDA build, with
# several GB of CUDA libraries). Everything else installs under the constraints file, so that
# no package can drag in another torch. TORCH_INDEX_URL picks another index (e.g. a CUDA one).
TORCH="torch==2.13.0"
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if "${PIP[@]}" install --no-index --no-deps "$TORCH" 2>/dev/null; then
        "${PIP[@]}" install "$TORCH"  # its own dependencies, from the package index
    else
        echo "install.sh: $TORCH from $TORCH_INDEX_URL"
        "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" "$TORCH"
    fi
fi
PLUGINS=()
for dir in plugins/*/ bench/; do
    PLUGINS+=(-e "$dir")
done
"${PIP[@]}" install -c requirements/constraints.txt -e ".[all]" "${PLUGINS[@]}" "$@"
# Python started in the folder that holds a clone named `accel` (git's default name for it)
# finds that folder first on its path and imports it as an empty namespace package `accel`:
# setuptools' editable finder (core/ -> accel) is asked only after the path search. This .pth,
# read after setuptools' own (site reads them in name order), asks accel's editable finder first.
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.meta_path.sort(key=lambda f: not getattr(f, '__module__', '').startswith('__editable___accel_core_'))" >"$SITE/accel-editable-first.pth"
