#!/usr/bin/env bash
# Set up (first time: what running needs, no test extras) and run the embedded default:
# python -m apps.grpo.main [overrides...] (FORGE_MAIN picks another app module).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FORGE_VENV:-.venv}/bin/python" -m ${FORGE_MAIN:-apps.grpo.main} "$@"
