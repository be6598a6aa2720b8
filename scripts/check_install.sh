#!/usr/bin/env bash
# Resolves forge's runtime install and its dev install (the test extras) against the public
# registry alone, as a new user's pip would, without installing anything and without downloading
# torch: exits non-zero on a dependency conflict. Run it before each release-worthy change
# (anything touching pyproject.toml's dependencies).
#
# How: a throwaway venv with a recent pip; every pip setting of this machine is switched off
# (PIP_CONFIG_FILE=/dev/null skips all pip config files, PIP_* variables are dropped, so no local
# wheel directory, mirror or constraint file takes part); `pip install --dry-run
# --ignore-installed` with fast-deps, which reads each wheel's metadata through HTTP range
# requests: a few MB in all instead of the multi-GB CUDA torch and its nvidia-* wheels.
#
# Resolved: `.` and `.[dev]`, each with the torch the resolver picks (the same for both, or run.sh
# and test.sh would fight over one venv) and with every requirement
# in FORGE_CHECK_TORCH (default: torch==2.13.0, the CPU wheel this project's machines carry).
set -euo pipefail
cd "$(dirname "$0")/.."
for v in $(compgen -e | grep '^PIP_' || true); do unset "$v"; done
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "check_install.sh: needs Python >= 3.11 (set PYTHON=)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
vpy="$tmp/venv/bin/python"
# fast-deps with --dry-run skips the wheel downloads since pip 24.x; pip 23 still fetched them
"$vpy" -m pip install -q "pip>=25.1"
echo "check_install.sh: $("$vpy" -m pip --version | cut -d' ' -f1-2), public registry only ($("$vpy" -m pip config list | tr '\n' ' '))"

fail=0
torch_picked=""
check() {  # label, requirements...
  local label=$1; shift
  local t0=$SECONDS rc=0
  "$vpy" -m pip install --dry-run --ignore-installed --use-feature=fast-deps --report "$tmp/report.json" \
    "$@" >"$tmp/log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    echo "FAIL  $label ($*): pip exit $rc"
    grep -E "ERROR|conflict|depends on|requires" "$tmp/log" | sed 's/^/      /' | head -20
    fail=1
    return
  fi
  local picked
  picked=$("$vpy" - "$tmp/report.json" <<'EOF'
import json, sys
names = {"torch", "triton", "transformers", "torchmonarch", "openenv-core"}
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print(f"{len(got)} packages; " + ", ".join(f"{n} {got[n]}" for n in sorted(names) if n in got))
open(sys.argv[1] + ".torch", "w").write(got.get("torch", ""))
EOF
)
  echo "ok    $label: $picked ($((SECONDS - t0)) s)"
  torch_picked=$(cat "$tmp/report.json.torch")
}

check "runtime" .
runtime_torch=$torch_picked
check "dev" ".[dev]"
# run.sh then test.sh share one venv: extras that only resolve with an older torch than the
# runtime's (the resolver backtracks silently) would conflict there
if [ $fail -eq 0 ] && [ "$torch_picked" != "$runtime_torch" ]; then
  echo "FAIL  the dev extras resolve only with torch $torch_picked; the runtime install takes torch $runtime_torch"
  fail=1
fi
for req in ${FORGE_CHECK_TORCH-torch==2.13.0}; do
  check "runtime, $req" . "$req"
  check "dev, $req" ".[dev]" "$req"
done
[ $fail -eq 0 ] && echo "check_install.sh: every install resolves" || echo "check_install.sh: CONFLICT (see above)" >&2
exit $fail
