#!/usr/bin/env bash
# Prepare, on a machine with package-registry access, the Python 3.12 manylinux x86_64 wheels
# that scripts/gpu-check.sh installs on an offline GPU machine whose image already holds torch,
# triton, transformers, peft, accelerate, pytest, pandas and pyarrow, but not this project.
#
#   bash scripts/gpu-wheels.sh [DIR]          download + build into DIR (default .gpu-wheels)
#   bash scripts/gpu-wheels.sh --check DIR    only the size check of DIR (no network)
#
# DIR then travels beside the checkout, and everything that travels (the checkout's tracked
# and untracked-not-ignored files plus DIR) must stay within GPU_WHEELS_LIMIT_MB (64 MiB):
# the script prints the total and exits 1 when it is over. An optional wheel (bitsandbytes)
# is kept only when it fits; what was left out, and why, is written to DIR/SKIPPED.txt and
# shows in the GPU check's report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT_MB=${GPU_WHEELS_LIMIT_MB:-64}

# size_check DIR: print the sizes; exit status 1 when checkout + DIR exceed LIMIT_MB MiB.
size_check() {
    "$PY" - "$1" "$LIMIT_MB" <<'EOF'
import os, subprocess, sys
folder, limit_mb = sys.argv[1], float(sys.argv[2])
def tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
checkout = sum(os.path.getsize(p) for p in (x.decode() for x in listed if x) if os.path.isfile(p))
wheels = tree_bytes(folder)
total, limit = checkout + wheels, limit_mb * 2**20
mib = lambda n: f"{n / 2**20:.1f} MiB"
print(f"gpu-wheels: {folder}: {mib(wheels)}; checkout: {mib(checkout)}; "
      f"total {mib(total)} of {mib(limit)}")
if total > limit:
    print(f"gpu-wheels: error: {mib(total)} is over the {mib(limit)} carry limit; "
          f"remove wheels from {folder} or set GPU_WHEELS_LIMIT_MB", file=sys.stderr)
    sys.exit(1)
EOF
}

if [ "${1:-}" = "--check" ]; then
    [ -d "${2:-}" ] || { echo "gpu-wheels: error: --check needs a folder, got '${2:-}'" >&2; exit 2; }
    size_check "$2"
    exit $?
fi

DIR=${1:-.gpu-wheels}
rm -rf "$DIR"
mkdir -p "$DIR"
PIP=("$PY" -m pip --disable-pip-version-check -q)
# Pure-python or manylinux wheels for CPython 3.12 on x86-64, one version each, no dependency
# resolution (the image's own torch/transformers must never be replaced).
fetch() {  # fetch DEST SPEC...
    local dest=$1
    shift
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}
REQUIRED=(
    # accel-core's data loading (the image has pyarrow, pandas, xxhash, fsspec, huggingface-hub)
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # Liger-Kernel, the kernels' peer in benchmarks/gpu/kernels_bench.py
    liger-kernel==0.8.5
    # build backends for the editable installs of this checkout there (setuptools: accel-core,
    # hatchling: the plugins), installed into pip's isolated build environment
    setuptools==84.2.1 hatchling==1.33.0 packaging==26.4 pathspec==1.1.1 pluggy==1.7.0
    trove-classifiers==2026.9.21.13
    # the test runner, installed there only when the image lacks it
    pytest==9.2.0 pytest-timeout==2.4.0 iniconfig==2.3.1
)
fetch "$DIR" "${REQUIRED[@]}"
# This checkout's packages as wheels too: the fallback when an editable install fails there.
"${PIP[@]}" wheel --no-deps -w "$DIR" . plugins/*/ bench/

: >"$DIR/SKIPPED.txt"
echo "gptqmodel==7.6.0: no wheel (a source distribution that compiles CUDA extensions at install): GPTQ cases skip" >>"$DIR/SKIPPED.txt"
# bitsandbytes (~41 MiB: its CUDA libraries) enables the QLoRA tests and the QLoRA e2e variant.
OPTIONAL=(bitsandbytes==0.50.2)
for spec in "${OPTIONAL[@]}"; do
    scratch=$(mktemp -d)
    if ! fetch "$scratch" "$spec" >/dev/null 2>&1; then
        echo "$spec: not downloadable for Python 3.12 manylinux x86_64: its cases skip" >>"$DIR/SKIPPED.txt"
    else
        cp "$scratch"/*.whl "$DIR"/
        if ! size_check "$DIR" >/dev/null 2>&1; then
            rm -f "$DIR/$(basename "$scratch"/*.whl)"
            echo "$spec: wheel too large for the carry limit: its cases skip" >>"$DIR/SKIPPED.txt"
        fi
    fi
    rm -rf "$scratch"
done
ls -1 "$DIR"/*.whl | xargs -n1 basename >"$DIR/WHEELS.txt"
echo "gpu-wheels: $(wc -l <"$DIR/WHEELS.txt") wheels in $DIR; skipped:"
sed 's/^/  /' "$DIR/SKIPPED.txt"
size_check "$DIR"
