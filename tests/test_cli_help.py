"""`--help` of every app lists every config key (generated from the dataclasses), and the
`forge` command dispatches to the apps."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import pytest

import apps.cli as forge_cli
from forge.config.help import config_rows, field_docs, format_help

ROOT = Path(__file__).resolve().parents[1]


def dotted_keys(schema: type, prefix: str = "", sections: dict[str, type] | None = None) -> list[str]:
    """Every dotted key of `schema`, walked independently of forge.config.help."""
    sections = sections or {}
    out = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        out.append(key)
        sub = sections.get(key) or (hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None)
        if sub is not None:
            out += dotted_keys(sub, key, sections)
    return out


def _apps():
    from apps.demo.main import DemoConfig
    from apps.grpo.config import GRPOConfig
    from apps.grpo.main import HELP_SECTIONS
    from apps.sft.config import SFTConfig
    from forge.data.datasets import DatasetConfig
    return {"grpo": (GRPOConfig, HELP_SECTIONS), "sft": (SFTConfig, {"dataset": DatasetConfig}),
            "demo": (DemoConfig, {})}


@pytest.mark.parametrize("app", ["grpo", "sft", "demo"])
def test_help_lists_every_config_key(app, capsys):
    schema, sections = _apps()[app]
    flag = random.choice(["--help", "-h"])
    assert forge_cli.main([app, flag]) == 0
    text = capsys.readouterr().out
    listed = {line.split()[0].rstrip(":") for line in text.splitlines() if line.startswith("  ") and line.split()}
    keys = dotted_keys(schema, sections=sections)
    assert len(keys) > 10
    missing = [k for k in keys if k not in listed]
    assert not missing, f"forge {app} --help does not list {missing}"
    for form in ("--a.b v", "--a.b=v", "a.b=v", "~a.b", "${"):
        assert form in text
    for yaml in (ROOT / "apps" / app).glob("*.yaml"):
        assert yaml.name in text
    assert text.count(f"python -m apps.{app}.main") >= 3  # the examples of the module docstring


def test_help_shows_the_values_of_the_given_overrides(capsys):
    lr = random.choice([1e-5, 2e-4, 7e-3])
    steps = random.randint(3, 900)
    from apps.grpo.main import cli
    assert cli([f"--trainer.optimizer.lr={lr}", "--steps", str(steps), "--help"]) == {}
    text = capsys.readouterr().out
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  trainer.optimizer.lr ") or
            ln.startswith("  steps ")}
    assert f"= {lr!r}" in line["trainer.optimizer.lr"] and f"= {steps}" in line["steps"]


@dataclass
class _Inner:
    """An inner section."""

    depth: int = 3  # how deep
    # the width, said
    # over two lines
    width: float = 1.5


@dataclass
class _Outer:
    name: str = "x"  # the name
    inner: _Inner = field(default_factory=_Inner)
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "from metadata"})
    bare: int = 7


def test_meanings_come_from_comments_and_metadata(tmp_path):
    docs = field_docs(_Outer)
    assert docs == {"name": "the name", "extra": "from metadata"}
    assert field_docs(_Inner) == {"depth": "how deep", "width": "the width, said over two lines"}
    (tmp_path / "a.yaml").write_text("# first line\nname: y\n")
    v = random.randint(10, 99)
    text = format_help("prog", "Does a thing.", _Outer, _Outer(inner=_Inner(depth=v)), tmp_path)
    assert "inner.depth" in text and f"= {v}" in text and "how deep" in text and "a.yaml" in text
    rows = {r[0]: r for r in config_rows(_Outer, _Outer())}
    assert set(rows) == {"name", "inner", "inner.depth", "inner.width", "extra", "bare"}
    assert rows["bare"][1:4] == ("7", "int", "")


def test_forge_dispatches_to_the_app(monkeypatch):
    import apps.sft.main
    seen = []
    monkeypatch.setattr(apps.sft.main, "cli", lambda argv: seen.append(argv))
    args = [f"--steps={random.randint(1, 50)}", "~eval", "--model", "tiny"]
    assert forge_cli.main(["sft", *args]) == 0
    assert seen == [args]
    assert forge_cli.main(["nope"]) == 2


def test_forge_command_version_and_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "apps.cli", "--version"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("forge "), r.stderr
    r = subprocess.run([sys.executable, "-m", "apps.cli", "--help"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("grpo", "sft", "demo", "--version")), r.stderr
