"""bench/_record.py: every bench result file records the commit, command, device and date."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("_record", ROOT / "bench" / "_record.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_json_records_commit_command_device_date(tmp_path, monkeypatch):
    rec = _load()
    monkeypatch.setattr(sys, "argv", ["bench/x.py", "--out", "r.json", "--name", "two words"])
    out = tmp_path / "r.json"
    rec.write_json(out, {"tokens_per_s": 123.5})
    data = json.loads(out.read_text())
    assert next(iter(data)) == "record" and data["tokens_per_s"] == 123.5
    r = data["record"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    assert r["commit"] == (head or None)
    assert r["command"].endswith("bench/x.py --out r.json --name 'two words'")
    assert r["device"] and r["date"][:2] == "20"
    rec.write_json(out, [1, 2])  # a non-dict result keeps its value under "result"
    assert json.loads(out.read_text())["result"] == [1, 2]


def test_every_bench_script_that_writes_json_uses_the_helper():
    for p in sorted((ROOT / "bench").glob("*.py")):
        src = p.read_text()
        if p.name == "_record.py" or "--out" not in src:
            continue
        assert "_record.write_json(" in src, f"{p.name} writes results without bench/_record.py"


def test_every_kept_result_says_what_made_it_and_is_cited():
    """bench/results keeps the results the notes cite, each with its record (commit, date, device)."""
    cited_in = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
    for p in sorted((ROOT / "bench" / "results").glob("*.json")):
        r = json.loads(p.read_text()).get("record")
        assert isinstance(r, dict) and r.get("commit") and r.get("date") and r.get("device"), p.name
        assert p.name in cited_in, f"{p.name} is cited by no note (docs/, README.md): cite it or remove it"
