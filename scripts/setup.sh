#!/usr/bin/env bash
# Creates .venv (once) and installs forge with the CPU build of torch. Idempotent and quick
# when nothing changed. FORGE_VENV overrides the location.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FORGE_VENV:-.venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
stamp="$venv/.forge-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch is pinned to the CPU wheel that machines of this kind carry; a looser spec would
  # pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[dev]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$venv/bin/python" -c "import forge, torch" || { echo "forge install failed" >&2; exit 1; }
  touch "$stamp"
fi

# bubblewrap sandboxes untrusted code (forge.envs.sandbox). Best effort: without it forge falls
# back to unshare + rlimits (with a warning) or refuses under `sandbox: strict`.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo_="sudo -n"; else sudo_=skip; fi
  fi
  if [ "$sudo_" != skip ]; then
    { $sudo_ apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q bubblewrap >/dev/null 2>&1; }; } \
      || echo "note: could not install bubblewrap; the code sandbox will use its unshare fallback" >&2
  fi
fi
