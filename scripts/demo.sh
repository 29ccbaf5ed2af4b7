#!/usr/bin/env bash
# Install accel with its plugins and fine-tune the embedded tiny model with accelerations on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/accel train --demo --fast_kernels True True True --padding_free huggingface "$@"
