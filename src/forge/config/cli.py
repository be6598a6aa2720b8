"""Command-line parsing: `--config x.yaml` plus overrides in every form torchforge users type.

Accepted forms (they can be mixed):  `a.b=v`, `--a.b v`, `--a.b=v`, `~a.b` (delete a key),
`+a.b=v` (add a key, Hydra style). `a.b=None` sets null (as torchforge's CLI does). A bare flag `--a.b` followed by another flag or nothing
means `true`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from forge.config.errors import ConfigError


@dataclass
class ParsedArgs:
    config_paths: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # "a.b=v" dotlist entries
    deletions: list[str] = field(default_factory=list)  # "a.b"
    flags: dict[str, bool] = field(default_factory=dict)  # --resume and similar


# flags every app accepts: `--debug` shows the traceback of a config error (see `run_cli`)
COMMON_FLAGS = ("debug",)


def parse_cli(argv: list[str], flags: tuple[str, ...] = ("resume",)) -> ParsedArgs:
    out = ParsedArgs()
    flags = tuple(flags) + COMMON_FLAGS
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c", "--config-path"):
            if i + 1 >= len(argv):
                raise ConfigError(f"'{arg}' needs a YAML path after it")
            out.config_paths.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            out.config_paths.append(arg.split("=", 1)[1])
            i += 1
            continue
        if arg.startswith("~"):
            out.deletions.append(arg[1:])
            i += 1
            continue
        if arg.startswith("--"):
            body = arg[2:]
            if body.replace("-", "_") in flags and "=" not in body:
                out.flags[body.replace("-", "_")] = True
                i += 1
                continue
            if "=" in body:
                out.overrides.append(body)
                i += 1
                continue
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or _is_next_arg(nxt):
                out.overrides.append(f"{body}=true")
                i += 1
            else:
                out.overrides.append(f"{body}={nxt}")
                i += 2
            continue
        if "=" in arg:
            out.overrides.append(arg.lstrip("+"))
            i += 1
            continue
        raise ConfigError(
            f"cannot read command-line argument '{arg}': expected --config PATH, "
            "key=value, --key value, --key=value or ~key"
        )
    return out


# `a.b=v` / `+a.b=v` and `~a.b`: after a bare `--flag` these start the next argument, they
# are not its value (write `--name=x=y` for a value that itself looks like an override)
_OVERRIDE = re.compile(r"^\+?[A-Za-z_][\w-]*(\.[\w-]+)*=")
_DELETION = re.compile(r"^~[A-Za-z_][\w-]*(\.[\w-]+)*$")


def _is_next_arg(s: str) -> bool:
    if s.startswith("--"):
        return not _is_number(s)
    return bool(_OVERRIDE.match(s) or _DELETION.match(s))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
