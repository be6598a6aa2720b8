"""Configuration: YAML through OmegaConf, CLI overrides as torchforge users type them, and
validation into typed dataclasses.

    cfg, raw = load_config(sys.argv[1:], MyConfig, default_yaml="apps/x/default.yaml")

Resolvers: `${sum:a,b}` (torchforge's), `${oc.env:USER}` (OmegaConf's), plus normal
`${a.b}` interpolation.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from forge.config.cli import ParsedArgs, parse_cli
from forge.config.errors import ConfigError
from forge.config.schema import BuildReport, build

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("forge.config")



def _sum(*xs: Any) -> Any:
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"${{sum:...}} adds numbers, got {x!r}")
    return sum(xs)


if not OmegaConf.has_resolver("sum"):
    OmegaConf.register_new_resolver("sum", _sum)
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: a * b)


def load_yaml(path: str | os.PathLike) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: '{p}' (pass an existing YAML with --config)")
    try:
        cfg = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file '{p}' must hold a mapping at top level, got a list")
    return cfg


def compose(parsed: ParsedArgs, default_yaml: str | os.PathLike | None = None) -> DictConfig:
    """Merge the YAML files (or the default), apply overrides and deletions, resolve."""
    paths = parsed.config_paths or ([default_yaml] if default_yaml else [])
    cfg = OmegaConf.create({})
    for p in paths:
        cfg = OmegaConf.merge(cfg, load_yaml(p))
    for key in parsed.deletions:
        _delete(cfg, key)
    for item in parsed.overrides:
        key, _, value = item.partition("=")
        try:
            # to_container(resolve=False): an override like `a.b=${c.d}` stays an
            # interpolation, resolved against the whole config later, not against itself
            parsed_value = _parse_value(value)
            OmegaConf.update(cfg, key, parsed_value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply override '{item}': {e}") from e
    return cfg


def _parse_value(value: str) -> Any:
    """An override's value as YAML reads it; `None` is null, as torchforge's CLI maps it
    (YAML would read it as the string 'None', which no numeric or path key accepts)."""
    if value == "":
        return ""
    if value == "None":
        return None
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"_v={value}"]), resolve=False)["_v"]


def _delete(cfg: DictConfig, key: str) -> None:
    parts = key.split(".")
    node: Any = cfg
    for p in parts[:-1]:
        if not isinstance(node, DictConfig) or p not in node:
            raise ConfigError(f"cannot delete '~{key}': key '{p}' does not exist")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"cannot delete '~{key}': it is not in the config")
    del node[parts[-1]]


def to_container(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {e}") from e


def load_config(
    argv: list[str],
    schema: type[T],
    default_yaml: str | os.PathLike | None = None,
    flags: tuple[str, ...] = ("resume",),
) -> tuple[T, BuildReport, ParsedArgs]:
    parsed = parse_cli(argv, flags=flags)
    data = to_container(compose(parsed, default_yaml))
    report = BuildReport()
    cfg = build(schema, data, report=report)
    if report.unused:
        log.warning("%s", report.describe())
    return cfg, report, parsed


def run_cli(fn: Callable[[list[str]], R], argv: list[str]) -> R:
    """Run an app's `fn(argv)`: a `ConfigError` prints its message alone and exits with status 2
    (a traceback would bury the one line that says which key is wrong); `--debug` anywhere on
    the command line re-raises it with the traceback."""
    try:
        return fn(argv)
    except ConfigError as e:
        if "--debug" in argv:
            raise
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "BuildReport",
    "ConfigError",
    "ParsedArgs",
    "build",
    "compose",
    "load_config",
    "load_yaml",
    "parse_cli",
    "run_cli",
    "to_container",
]
