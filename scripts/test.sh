#!/usr/bin/env bash
# Install accel, its plugins and the test requirements, then lint (ruff) and run the whole
# test suite on CPU. Lint runs first but does not stop the tests; either failing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh -r requirements/test.txt
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
.venv/bin/ruff check core cli plugins bench tests benchmarks scripts || status=$?
.venv/bin/ruff format --check core cli plugins bench tests benchmarks scripts || status=$?
.venv/bin/python -m pytest -q "$@" || status=$?
exit $status
