"""Turn a plain nested dict (from OmegaConf) into typed dataclasses, with precise errors.

Every error names the full dotted path. An unknown key suggests the closest valid one. A
dataclass may declare `IGNORED_KEYS: ClassVar[frozenset[str]]`: keys torchforge configs carry
that forge accepts but does not use; they are collected into `BuildReport.unused` so the
caller can report them once instead of silently dropping them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from forge.config.errors import ConfigError

T = TypeVar("T")


@dataclass
class BuildReport:
    unused: list[str] = field(default_factory=list)
    # "using X instead of Y because ...": where forge reads a config differently from its face
    # value (a torchforge default it fills in), said once at start
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line naming every key that was accepted but is not used (empty if none)."""
        if not self.unused:
            return ""
        return f"config keys accepted for compatibility but not used by forge: {', '.join(self.unused)}"


def build(schema: type[T], data: Any, path: str = "", report: BuildReport | None = None) -> T:
    """Validate `data` against dataclass `schema` and instantiate it (recursively)."""
    report = report if report is not None else BuildReport()
    return _build_dataclass(schema, data, path, report)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build_dataclass(schema: type, data: Any, path: str, report: BuildReport) -> Any:
    if data is None:
        data = {}
    if isinstance(data, schema):
        return data
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{path or '<root>'}' must be a mapping (section {schema.__name__}), got {_describe(data)}"
        )
    hints = get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    ignored = getattr(schema, "IGNORED_KEYS", frozenset())
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        full = _join(path, key)
        if key not in fields:
            if key in ignored:
                report.unused.append(full)
                continue
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" — did you mean '{_join(path, close[0])}'?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key '{full}'{hint} (valid keys here: {valid})")
        kwargs[key] = _coerce(hints[key], value, full, report)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return schema(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid section '{path or '<root>'}': {e}") from e


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(tp: Any, value: Any, path: str, report: BuildReport) -> Any:
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path, report)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # Optional[X]: X's own, precise message
            raise ConfigError(f"{errors[0]} (or null)")
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"'{path}' must be {names}, got {_describe(value)}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'{path}' must be one of {list(allowed)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, report)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {_describe(value)}")
        args = get_args(tp)
        if not args or args == (Any,):
            return list(value)
        inner = args[0]
        return [_coerce(inner, v, f"{path}[{i}]", report) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {_describe(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is not Any:
            return {k: _coerce(args[1], v, _join(path, str(k)), report) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be a boolean (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{path}' must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" as a string; accept it as the number users meant
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{path}' must be a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{path}' must be a string, got {_describe(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {_describe(value)}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is typing.Literal:
        return f"one of {list(get_args(tp))}"
    return getattr(tp, "__name__", str(tp))
