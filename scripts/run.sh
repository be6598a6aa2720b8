#!/usr/bin/env bash
# Set up (first time) and run the embedded default: python -m apps.grpo.main [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FORGE_VENV:-.venv}/bin/python" -m ${FORGE_MAIN:-apps.grpo.main} "$@"
