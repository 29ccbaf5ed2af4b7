#!/usr/bin/env bash
# One-command GPU check (one CUDA device, at most ~8 minutes), or its CPU dry run:
#   bash scripts/gpu-check.sh OUTDIR [--dry-run]
# Steps, each under its own timeout (a hang cannot eat the window), the report re-rendered
# after each so a cut-short run still leaves OUTDIR/report.md: env, install (offline, from the
# carried .gpu-wheels; never touches the image's torch/transformers), a) kernel tests compiled
# for real, b) benchmarks/gpu/kernels_bench.py, c) benchmarks/gpu/e2e.py. See benchmarks/gpu/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=""; DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -*) echo "gpu-check: error: unknown option $arg (usage: gpu-check.sh OUTDIR [--dry-run])" >&2; exit 2 ;;
        *) OUTDIR=$arg ;;
    esac
done
[ -n "$OUTDIR" ] || { echo "gpu-check: error: OUTDIR is required (usage: gpu-check.sh OUTDIR [--dry-run])" >&2; exit 2; }
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR/steps.jsonl"
# The GPU window is ~8 minutes; the dry run on a shared CPU gets 3x every step's time instead
# (it checks that every step works, not how fast).
SCALE=1; [ "$DRY" = 1 ] && SCALE=3
TOTAL_S=${GPU_CHECK_TOTAL_S:-$((470 * SCALE))}
START=$SECONDS
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    touch "$OUTDIR/DRY_RUN"
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    rm -f "$OUTDIR/DRY_RUN"
    PY=${PYTHON:-python3}
fi
REPORT_PY=$PY

record() {  # record NAME STATUS SECONDS DETAIL
    "$REPORT_PY" -c 'import json,sys; print(json.dumps(dict(zip(["name","status","seconds","detail"], sys.argv[1:]))))' \
        "$1" "$2" "$3" "$4" >>"$OUTDIR/steps.jsonl"
    "$REPORT_PY" benchmarks/gpu/check_report.py report "$OUTDIR" || true
}
budget() {  # budget WANTED: seconds left for a step, keeping 15 s for the report
    local left=$((TOTAL_S - (SECONDS - START) - 15))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
run_step() {  # run_step NAME WANTED_S CMD...: CMD's output in OUTDIR/NAME.log
    local name=$1 t; t=$(budget $(($2 * SCALE))); shift 2
    if [ "$t" -lt 10 ]; then record "$name" skipped 0 "no time left in the ${TOTAL_S} s window"; return; fi
    local t0=$SECONDS rc
    timeout -k 5 "$t" "$@" >"$OUTDIR/$name.log" 2>&1; rc=$?
    local status=ok detail="exit 0"
    if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; detail="stopped at its ${t} s limit"
    elif [ $rc != 0 ]; then status=failed; detail="exit $rc: $(tail -n 1 "$OUTDIR/$name.log" | cut -c1-200 | tr '|' '/')"; fi
    record "$name" "$status" $((SECONDS - t0)) "$detail"
}

# env (written again after the install: the versions the steps run with)
write_env() {
    "$PY" - >"$OUTDIR/env.json" 2>/dev/null <<'PYEOF' || echo '{}' >"$OUTDIR/env.json"
import json, platform, time
from importlib.metadata import version
info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version()}
import torch
info["torch"] = torch.__version__
info["cuda"] = torch.version.cuda
info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only"
for name in ("triton", "transformers", "peft", "accelerate", "datasets", "liger-kernel", "bitsandbytes", "pytest"):
    try: info[name] = version(name)
    except Exception: info[name] = "not installed"
print(json.dumps(info, indent=1))
PYEOF
}
write_env
WHEELS=${GPU_WHEELS:-.gpu-wheels}
[ -f "$WHEELS/SKIPPED.txt" ] && cp "$WHEELS/SKIPPED.txt" "$OUTDIR/wheels-skipped.txt"
record env ok 0 "see Machine and versions"

# install (offline): this checkout built into wheels there (build backends from the wheel
# folder), installed with the carried wheels into a folder that PYTHONPATH puts first. No venv:
# the image's python3 is itself a venv, and a venv made from it would not see its torch. No
# dependency resolution, so the image's torch/triton stay what they are.
if [ "$DRY" = 1 ]; then
    record install skipped 0 "dry run: uses the current environment ($PY)"
elif [ ! -d "$WHEELS" ]; then
    record install failed 0 "no $WHEELS: run scripts/gpu-wheels.sh here and carry .gpu-wheels"
else
    SITE=${GPU_CHECK_SITE:-/tmp/accel-gpu-site}
    install() {
        set -e
        rm -rf "$SITE" "$SITE.wheels"
        mkdir -p "$SITE.wheels"
        local torch_before; torch_before=$("$PY" -c 'import torch; print(torch.__version__)')
        local pip=("$PY" -m pip --disable-pip-version-check -q)
        local offline=(--no-index --find-links "$WHEELS" --no-deps)
        if ! "${pip[@]}" wheel "${offline[@]}" -w "$SITE.wheels" . plugins/*/ bench/; then
            echo "building this checkout failed; installing the folder's prebuilt accel wheels"
            rm -f "$SITE.wheels"/*.whl
            cp "$WHEELS"/accel_*.whl "$SITE.wheels"/
        fi
        local extra=(datasets dill multiprocess liger-kernel)
        ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1 && extra+=(bitsandbytes)
        ls "$WHEELS"/transformers-*.whl >/dev/null 2>&1 && extra+=(transformers)
        "$PY" -c 'import pytest' 2>/dev/null || extra+=(pytest iniconfig pluggy)
        "$PY" -c 'import pytest_timeout' 2>/dev/null || extra+=(pytest-timeout)
        "${pip[@]}" install "${offline[@]}" --no-compile --target "$SITE" "$SITE.wheels"/*.whl "${extra[@]}"
        PYTHONPATH="$SITE" "$PY" -c 'import accel, accel_fused_ops, accel_moe, datasets, liger_kernel'
        [ "$(PYTHONPATH="$SITE" "$PY" -c 'import torch; print(torch.__version__)')" = "$torch_before" ]
    }
    run_step install 90 bash -c "$(declare -f install); PY='$PY' SITE='$SITE' WHEELS='$WHEELS' install"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    write_env
fi

# a) kernel tests
T=plugins/fused_ops/tests
TEST_FILES="$T/test_rms_norm.py $T/test_rms_norm_wide.py $T/test_swiglu.py $T/test_rope.py $T/test_cross_entropy.py $T/test_linear_cross_entropy.py $T/test_linear_cross_entropy_online.py $T/test_loss_options.py $T/test_fused_lora.py $T/test_dequant.py plugins/moe/tests/test_scatter_gemm.py plugins/moe/tests/test_gemm_tiles.py"
if [ "$DRY" = 1 ]; then
    TEST_FILES="$T/test_swiglu.py plugins/moe/tests/test_scatter_gemm.py plugins/moe/tests/test_gemm_tiles.py"
    TEST_SEL=(-k "fp32 and not bf16")
    run_step tests 90 env "$PY" -m pytest -q -p no:cacheprovider --timeout 60 --junitxml "$OUTDIR/tests.xml" "${TEST_SEL[@]}" $TEST_FILES
else
    run_step tests 190 env -u TRITON_INTERPRET -u ACCEL_KERNEL_IMPL "$PY" -m pytest -q -p no:cacheprovider --timeout 120 -rfE --junitxml "$OUTDIR/tests.xml" $TEST_FILES
fi
[ -f "$OUTDIR/tests.xml" ] && GPU_CHECK_TEST_FILES="$TEST_FILES" "$PY" benchmarks/gpu/check_report.py tests "$OUTDIR" >>"$OUTDIR/tests.log" 2>&1
"$REPORT_PY" benchmarks/gpu/check_report.py report "$OUTDIR"

# b) kernels, c) end to end
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
run_step kernels 130 env -u TRITON_INTERPRET "$PY" benchmarks/gpu/kernels_bench.py "${DRYFLAG[@]}" --budget-s 100 --out "$OUTDIR/kernels.json" --csv "$OUTDIR/kernels.csv"
run_step e2e 200 "$PY" benchmarks/gpu/e2e.py "${DRYFLAG[@]}" --budget-s 120 --variant-timeout-s 70 --out "$OUTDIR/e2e.json" --work "${GPU_CHECK_WORK:-/tmp/accel-gpu-e2e}"
"$REPORT_PY" benchmarks/gpu/check_report.py report "$OUTDIR"
echo "gpu-check: report in $OUTDIR/report.md ($((SECONDS - START)) s)"
