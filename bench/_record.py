"""Every bench result file says what made it: `write_json(path, result)` adds a "record" entry
(commit, command, device, date) before the result's own keys. One helper for all bench scripts."""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}" if n > 1 else torch.cuda.get_device_name(0)
    return "cpu"


def record() -> dict[str, Any]:
    """commit (and whether the tree had uncommitted changes), command line, device, UTC date."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "device": _device(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(path: str | Path, result: Any, indent: int = 1) -> None:
    """Write `result` to `path` with the record first (a non-dict result goes under "result")."""
    body = {"record": record(), **result} if isinstance(result, dict) else {"record": record(), "result": result}
    Path(path).write_text(json.dumps(body, indent=indent))
