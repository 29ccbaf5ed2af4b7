#!/usr/bin/env bash
# Build wheels of accel-core and of every package of this checkout (the plugins and
# accel-bench) into one folder. pip then installs them by name, extras included, without the
# checkout:
#   bash scripts/build-wheels.sh dist/wheels
#   pip install --find-links dist/wheels "accel-core[fused_ops,peft]"
#   accel install odm --find-links dist/wheels        # later, one more plugin
# Only these packages are built (--no-deps): their dependencies come from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/wheels}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
PACKAGES=(.)
for dir in plugins/*/ bench/; do
    PACKAGES+=("$dir")
done
# setuptools builds in each package's own folder (build/); remove only the ones made here
MADE=()
for dir in "${PACKAGES[@]}"; do
    [ -e "$dir/build" ] || MADE+=("$dir/build")
done
"$PYTHON" -m pip --disable-pip-version-check wheel --quiet --no-deps --wheel-dir "$OUT" "${PACKAGES[@]}"
for made in "${MADE[@]}"; do
    rm -rf "$made"
done
echo "accel: wheels in $OUT:"
ls -1 "$OUT" | grep -E '^accel_' | sed 's/^/  /'
