#!/usr/bin/env bash
# Install accel, its plugins and the test requirements, then lint (ruff), compile every Triton
# kernel for sm_80 and sm_90 (the compile gate: no GPU needed, a few minutes) and run the whole
# test suite on CPU. No step stops the next; any failing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh -r requirements/test.txt
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
.venv/bin/ruff check core cli plugins bench tests benchmarks scripts || status=$?
.venv/bin/ruff format --check core cli plugins bench tests benchmarks scripts || status=$?
gate_log=$(mktemp)
# the tables only when it fails; its summary lines always
.venv/bin/python benchmarks/gpu/compile_check.py --targets 80 90 >"$gate_log" 2>&1 || {
    status=$?
    cat "$gate_log"
}
grep -E "^(compile gate|[0-9]+ kernel binaries)" "$gate_log" || true
rm -f "$gate_log"
.venv/bin/python -m pytest -q "$@" || status=$?
exit $status
