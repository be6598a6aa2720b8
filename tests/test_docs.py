"""The repo's docs are self-contained: every `*.md` that code, apps, docs or the README point to
is in the repo (a user-facing error or docstring naming a file that is not there is a dead end)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MD = re.compile(r"(?<![\w/.-])([\w./-]+\.md)\b")


def _sources() -> list[Path]:
    out = [ROOT / "README.md"]
    for d in ("src", "apps", "docs", "scripts", "bench"):
        out += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml")]
    return out


def test_every_markdown_file_named_in_the_repo_exists():
    missing, seen = [], set()
    for src in _sources():
        for m in MD.finditer(src.read_text(errors="replace")):
            name = m.group(1)
            seen.add(name)
            if "://" in name:
                continue
            if not any((base / name).is_file() for base in (ROOT, src.parent, ROOT / "docs")):
                missing.append(f"{src.relative_to(ROOT)}: {name}")
    assert not missing, missing
    # the scan is not vacuous: it reads the references docstrings carry (forge.data.collate's)
    assert "docs/CONTRACTS.md" in seen and "CONTRACTS.md" in seen
