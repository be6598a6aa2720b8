"""`--help` text generated from the config dataclasses, so it cannot drift from what is parsed.

Every key is listed with the value the program would use (dataclass defaults merged with the
default YAML and any `--config`/overrides given next to `--help`), its type, and a one-line
meaning taken from the field's `metadata["help"]`, else the comment on the field's line (or the
comment lines just above it) in the dataclass source.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, get_type_hints

HELP_FLAGS = ("-h", "--help")

OVERRIDE_FORMS = """\
  --config PATH, -c PATH   a YAML file (repeat to layer files; later ones win)
  --a.b v  --a.b=v  a.b=v  set a key (values are YAML: 3, 1e-4, true, null, [1, 2], {k: v})
  --a.b                    a bare flag sets the key to true
  ~a.b                     delete a key (back to the dataclass default)
  +a.b=v                   add a key (Hydra style; same as a.b=v)
  a.b=${c.d}               interpolation; also ${sum:a,b}, ${mul:a,b}, ${oc.env:USER}
A wrong key fails at start naming its full dotted path and the closest valid key."""


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def without_help(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in HELP_FLAGS]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line meaning, for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_source_docs(klass))
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = str(f.metadata["help"])
    return docs


def _source_docs(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built in a REPL, frozen): types and defaults only
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    out: dict[str, str] = {}
    body = ast.parse(src).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno or node.lineno)
        if text is None:  # comment lines directly above the field
            above, ln = [], node.lineno - 1
            while ln >= 1 and lines[ln - 1].strip().startswith("#"):
                above.insert(0, comments.get(ln, ""))
                ln -= 1
            text = " ".join(above)
        if text:
            out[node.target.id] = text
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _short(value: Any, width: int = 48) -> str:
    s = repr(value)
    return s if len(s) <= width else s[: width - 3] + "..."


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_rows(schema: type, value: Any, prefix: str = "",
                sections: dict[str, type] | None = None) -> list[tuple[str, str, str, str, bool]]:
    """(dotted key, value, type, meaning, is a section header) for every field of `schema`, recursively.

    `value` is an instance of `schema` or a dict of its keys (missing keys take the field
    default). `sections` maps the dotted path of a dict-typed field to the dataclass that
    validates it (e.g. GRPO's `policy.engine_args` -> EngineConfig), so its keys are listed too.
    """
    sections = sections or {}
    hints = get_type_hints(schema)
    docs = field_docs(schema)
    rows: list[tuple[str, str, str, str, bool]] = []
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, dict):
            v = value[f.name] if f.name in value else _field_default(f)
        else:
            v = getattr(value, f.name, _field_default(f))
        tp = hints.get(f.name, Any)
        optional = _optional_dataclass(tp)
        sub = sections.get(key) or (tp if dataclasses.is_dataclass(tp) else optional)
        if sub is not None:
            # an optional section (e.g. `lora`) that is off: its keys are listed with their defaults
            shown = "None" if (optional is not None and v is None) else ""
            rows.append((key, shown, sub.__name__ + (" | None" if optional is not None else ""),
                         docs.get(f.name) or _first_line(sub.__doc__), True))
            rows.extend(config_rows(sub, v if v is not None else {}, key, sections))
            if isinstance(v, dict):  # keys given that the section's dataclass does not have
                own = {g.name for g in dataclasses.fields(sub)}
                rows.extend((f"{key}.{k}", _short(x), "", "(not a key of this section's dataclass)", False)
                            for k, x in v.items() if k not in own)
            continue
        shown = "<required>" if v is dataclasses.MISSING else _short(v)
        rows.append((key, shown, _type_name(tp), docs.get(f.name, ""), False))
    return rows


def _optional_dataclass(tp: Any) -> type | None:
    """X for a `X | None` field whose X is a dataclass (an optional section), else None."""
    args = typing.get_args(tp)
    if len(args) == 2 and type(None) in args:
        x = args[0] if args[1] is type(None) else args[1]
        return x if dataclasses.is_dataclass(x) else None
    return None


def _first_line(doc: str | None) -> str:
    # a dataclass without a docstring gets a generated "Name(a: int, ...)" one: not a meaning
    if not doc or "(" in doc.split("\n", 1)[0][:60] and doc.rstrip().endswith(")"):
        return ""
    return doc.strip().split("\n\n", 1)[0].replace("\n", " ")


def shipped_configs(config_dir: Path) -> list[tuple[str, str]]:
    """(path, first comment line) of every YAML shipped next to an app."""
    out = []
    for p in sorted(Path(config_dir).glob("*.yaml")):
        first = ""
        for line in p.read_text().splitlines():
            if line.startswith("#"):
                first = line.lstrip("#").strip()
                break
        try:
            shown = str(p.resolve().relative_to(Path.cwd()))
        except ValueError:
            shown = str(p)
        out.append((shown, first))
    return out


def format_help(prog: str, doc: str, schema: type, config: Any, config_dir: Path,
                sections: dict[str, type] | None = None, flags: dict[str, str] | None = None,
                default_yaml: Path | None = None) -> str:
    """The full `--help` text: what the program does (the app module's docstring, with its
    examples), the override forms, the shipped configs, and every config key."""
    rows = config_rows(schema, config, "", sections)
    w_key = min(max(len(r[0]) for r in rows), 44)
    w_val = min(max(len(r[1]) for r in rows), 30)
    w_tp = min(max(len(r[2]) for r in rows), 20)
    out = [f"usage: {prog} [--config PATH ...] [overrides ...]" + "".join(f" [--{k}]" for k in (flags or {})),
           "", inspect.cleandoc(doc), "", "Command line:", OVERRIDE_FORMS]
    for k, meaning in (flags or {}).items():
        out.append(f"  --{k:<23}{meaning}")
    out.append("  -h, --help               this text (after --config/overrides: the values they give)")
    out += ["", f"Shipped configs ({config_dir.name}/):"]
    for path, first in shipped_configs(config_dir):
        out.append(f"  {path:<36} {first}")
    src = f" merged with {default_yaml.name}" if default_yaml else ""
    out += ["", f"Config keys (value = the dataclass default{src} and any --config/overrides given; type; meaning):"]
    for key, val, tp, meaning, is_section in rows:
        if is_section:
            out.append(f"  {key}:" + (f"  ({tp}) {meaning}" if meaning else f"  ({tp})"))
            continue
        out.append(f"  {key:<{w_key}} = {val:<{w_val}} {tp:<{w_tp}} {meaning}".rstrip())
    return "\n".join(out) + "\n"
