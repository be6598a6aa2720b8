"""Local data files -> an HF `datasets` object (never the network).

A dataset `path` is a file, a glob, a directory (searched recursively), or a list of those.
In a directory laid out like a hub dataset (`main/train-00000.parquet`, `test.jsonl`), the
files whose name starts with the requested split are taken; otherwise every data file is.
"""

from __future__ import annotations

import glob as _glob
from collections.abc import Sequence
from pathlib import Path

import datasets


# extension -> the `datasets` builder that reads it
class DatasetError(ValueError):
    """A dataset that cannot be used as configured (missing column, empty, bad template)."""


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _data_files_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)


def _pick_split(files: list[Path], root: Path, split: str | None, name: str | None) -> list[Path]:
    if name:  # hub "config" subfolder, e.g. gsm8k's main/ vs socratic/
        sub = [f for f in files if name in f.relative_to(root).parts[:-1]]
        if sub:
            files = sub
    if split:
        matching = [f for f in files if f.name.lower().startswith(split.lower())
                    or split.lower() in (p.lower() for p in f.relative_to(root).parts[:-1])]
        if matching:
            return matching
    return files


def resolve_data_files(path: str | Path | Sequence[str | Path], split: str | None = None,
                       name: str | None = None) -> list[Path]:
    """Every local data file that `path` names, sorted; FileNotFoundError saying what was looked for."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise FileNotFoundError("dataset path is empty: give a file, a directory or a glob")
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if s.startswith("hf://"):
            raise FileNotFoundError(
                f"dataset path {s!r}: forge reads datasets from local files only; download it once and "
                f"point dataset.path at the local file or directory")
        if any(c in s for c in "*?["):
            hits = sorted(Path(h) for h in _glob.glob(s, recursive=True) if Path(h).is_file())
            if not hits:
                raise FileNotFoundError(f"dataset path {s!r}: the glob matches no file")
            out.extend(hits)
            continue
        q = Path(s).expanduser()
        if q.is_dir():
            found = _pick_split(_data_files_in(q), q, split, name)
            if not found:
                raise FileNotFoundError(
                    f"dataset directory {q}: no data file in it (looked for {sorted(set(_BUILDERS))})")
            out.extend(found)
        elif q.is_file():
            out.append(q)
        else:
            hint = ""
            if "/" in s and not s.startswith((".", "/", "~")) and len(Path(s).parts) == 2:
                hint = " (it looks like a hub name: forge does not download; give a local path)"
            raise FileNotFoundError(f"dataset file not found: {q.resolve()}{hint}")
    return out


def builder_for(files: Sequence[Path], fmt: str | None = None) -> str:
    """The `datasets` builder for these files; they must all be one kind."""
    if fmt:
        fmt = {"jsonl": "json"}.get(fmt, fmt)
        if fmt not in set(_BUILDERS.values()):
            raise ValueError(f"dataset format {fmt!r} unknown; expected one of {sorted(set(_BUILDERS.values()))}")
        return fmt
    kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = [str(f) for f in files if f.suffix.lower() not in _BUILDERS][:3]
        raise ValueError(f"dataset files {bad}: unknown extension; expected one of {sorted(_BUILDERS)} "
                         f"(or set dataset.format)")
    if len(kinds) > 1:
        raise ValueError(f"dataset files mix formats {sorted(k for k in kinds if k)}: use one kind per dataset")
    return kinds.pop()  # type: ignore[return-value]


def _is_empty(f: Path, builder: str) -> bool:
    """No rows at all (HF's readers fail on these with messages that do not say so)."""
    if f.stat().st_size == 0:
        return True
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(f).num_rows == 0
    if builder == "json" and f.stat().st_size < 64:
        return f.read_text().strip() in ("", "[]", "{}")
    return False


def load_local(path: str | Path | Sequence[str | Path], *, split: str | None = "train",
               name: str | None = None, streaming: bool = False,
               fmt: str | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """Load local files through `datasets.load_dataset(builder, data_files=..., streaming=...)`."""
    files = resolve_data_files(path, split, name)
    builder = builder_for(files, fmt)
    if all(_is_empty(f, builder) for f in files):
        shown = [str(f) for f in files][:5]
        raise DatasetError(f"dataset {shown} (split {split!r}) is empty: no rows to train on")
    # Every file becomes the single "train" split of this load: the split was chosen by file above.
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                     streaming=streaming)
    except Exception as e:  # pyarrow/json errors do not say which file; we do
        raise ValueError(f"could not read dataset {[str(f) for f in files][:5]} as {builder}: "
                         f"{type(e).__name__}: {e}") from e
