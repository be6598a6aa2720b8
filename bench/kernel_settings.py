"""`--kernels KEY=VALUE,...` for the benches: set module attributes of forge.engine.kernels (the kernels'
tuning knobs, e.g. ATTN_WARPS=8,ATTN_PREFETCH_TABLE=False) and get the previous values back to restore them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import kernels as K  # noqa: E402


def parse(spec: str) -> dict:
    """'KEY=VALUE,...' -> {KEY: value}; values are Python literals (True, 8, 'x') or else strings.
    A key forge.engine.kernels does not have is an error naming it."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not hasattr(K, key):
            raise SystemExit(f"kernel setting {item!r}: expected KEY=VALUE with KEY a setting of forge.engine.kernels")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def apply(settings: str | dict) -> dict:
    """Set them; returns the values they replaced (pass that to `apply` to restore)."""
    settings = parse(settings) if isinstance(settings, str) else settings
    saved = {k: getattr(K, k) for k in settings}
    for k, v in settings.items():
        setattr(K, k, v)
    return saved
