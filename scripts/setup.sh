#!/usr/bin/env bash
# Creates .venv (once) and installs forge into it. Idempotent and quick when nothing changed.
#
#   bash scripts/setup.sh          what running needs (scripts/run.sh)
#   bash scripts/setup.sh --dev    plus the test extras: pytest, Monarch, openenv, scipy, triton
#                                  (scripts/test.sh, CI)
#
# Which torch (the one large download), in this order:
#   (c) the venv, or the interpreter it is made from (PYTHON, else python3 on PATH: the active
#       environment), already imports a torch inside pyproject's range: it is kept, never
#       replaced. A new venv then sees that environment's site-packages (a .pth file), and the
#       install runs under a constraint torch==<that version>, so a conflict fails instead of
#       swapping it.
#   FORGE_TORCH set: that requirement, e.g. FORGE_TORCH="torch==2.14.1" (with
#       PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only build).
#   (a) pip's find-links (pip config) hold a torch wheel for this Python: that exact one. On this
#       project's machines and CI it is the local CPU wheel; an open spec would make pip take a
#       newer multi-GB CUDA build from the registry.
#   (b) otherwise pyproject's range from the public registry (on Linux the CUDA build, which
#       also runs on CPU).
# FORGE_VENV overrides the location of the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
case "${1:-}" in
  --dev) extras="[dev]" ;;
  "") ;;
  *) echo "setup.sh: unknown argument '$1' (expected nothing or --dev)" >&2; exit 2 ;;
esac
venv=${FORGE_VENV:-.venv}
py=${PYTHON:-python3}

# Prints the torch version if PYTHON ($1) imports a torch inside pyproject's torch range, else
# nothing. The range is read from pyproject.toml so that it is written in one place.
torch_in_range() {
  "$1" - <<'EOF' 2>/dev/null || true
import re, tomllib
spec = next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
            if re.match(r"torch\b", d))
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
import importlib.metadata, torch  # noqa: F401  (it must import, not just be listed)
# the distribution's version (what pip compares): PyPI's CUDA wheel is "2.14.1" while its
# torch.__version__ says "2.14.1+cu130"
v = importlib.metadata.version("torch")
if SpecifierSet(spec[len("torch"):]).contains(v.split("+")[0], prereleases=True):
    print(v)
EOF
}

if [ ! -x "$venv/bin/python" ]; then
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "setup.sh: forge needs Python >= 3.11; $py is $("$py" -V 2>&1). Set PYTHON=/path/to/python3.11" >&2; exit 1; }
  have=$(torch_in_range "$py")
  "$py" -m venv "$venv"
  if [ -n "$have" ]; then
    # --system-site-packages would not do: when $py is itself a venv's python it exposes the base
    # interpreter's packages, not that venv's. A .pth file appends the site-packages that hold
    # the torch (after .venv's own): pip sees it as installed, and never uninstalls anything
    # there (outside .venv's prefix).
    sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$py" -c 'import os, site, torch
paths = [os.path.dirname(os.path.dirname(torch.__file__))] + site.getsitepackages()
print("\n".join(dict.fromkeys(p for p in paths if os.path.isdir(p))))' > "$sp/zz_forge_torch_env.pth"
    echo "setup.sh: $py already has torch $have: $venv reuses it (through $sp/zz_forge_torch_env.pth)"
  fi
fi
vpy="$venv/bin/python"
stamp="$venv/.forge-installed${extras:+-dev}"
# pip's exit status (pipefail); the filtered line is noise from this project's machines' pip config.
pip_() { "$vpy" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

install_forge() {
have=$(torch_in_range "$vpy")
cons="$venv/.forge-torch-constraint.txt"
if [ -n "$have" ]; then
  echo "setup.sh: keeping torch $have"
else
  torch_req=${FORGE_TORCH:-}
  if [ -z "$torch_req" ]; then
    tag=$("$vpy" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    for d in $("$vpy" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p") ${PIP_FIND_LINKS:-}; do
      whl=$(ls "${d#file://}"/torch-*-"$tag"-"$tag"-*linux*"$(uname -m)".whl 2>/dev/null | sort -V | tail -1 || true)
      if [ -n "$whl" ]; then torch_req="torch==$(basename "$whl" | cut -d- -f2)"; break; fi
    done
  fi
  if [ -z "$torch_req" ]; then
    torch_req=$("$vpy" -c 'import re, tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if re.match(r"torch\b", d)))')
  fi
  echo "setup.sh: installing $torch_req (first time: a large download)"
  pip_ install --progress-bar off "$torch_req" | grep -E "^(Downloading|Successfully|ERROR)" || true
  have=$(torch_in_range "$vpy")
  [ -n "$have" ] || { echo "setup.sh: $torch_req did not give a torch inside pyproject's range" >&2; exit 1; }
fi
# The torch that is there stays: a dependency that wants another one is a clear conflict.
echo "torch==$have" > "$cons"
pip_ install -q -c "$cons" -e ".$extras"
"$vpy" -c "import forge, apps, torch" || { echo "forge install failed" >&2; exit 1; }
touch "$stamp"
[ -z "$extras" ] || touch "$venv/.forge-installed"
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  install_forge
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
