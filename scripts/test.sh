#!/usr/bin/env bash
# Set up (first time, with the test extras) and run the whole test suite on CPU. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev || exit 1
# lint first (seconds): pyproject's [tool.ruff] rules, the ruff version pinned in the dev extra
"${FORGE_VENV:-.venv}/bin/ruff" check src apps tests bench scripts || { echo "ruff check failed (see above)"; exit 1; }
"${FORGE_VENV:-.venv}/bin/python" -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi
exit $rc
