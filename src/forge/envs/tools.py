"""Tools a model calls: schemas from Python functions, Hermes/Qwen tool-call parsing, execution.

    @tool
    def calculator(expression: str) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: digits, + - * / ( ) only.
        '''

    reg = ToolRegistry([calculator])
    reg.schemas()                      # -> the chat template's `tools=` list (OpenAI/Qwen format)
    results, stats = await reg.run_calls(model_text)

Calls are parsed from `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (what Qwen2.5 /
Hermes templates emit; several per turn allowed). Nothing a model writes can crash the caller:
unparseable JSON, an unknown tool, bad arguments (`malformed`) or a tool that raises
(`errored`) all come back as an error text the model sees in its next turn.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import types
from collections import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from forge.errors import InfraError

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               dict: "object", list: "array", tuple: "array"}


# ---- schema from a function --------------------------------------------------------------------
def _type_schema(tp: Any) -> tuple[dict[str, Any], bool]:
    """(JSON schema, optional?) of a type hint."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        if len(args) == 1:
            return _type_schema(args[0])[0], optional
        return {"anyOf": [_type_schema(a)[0] for a in args]}, optional
    if origin is Literal:
        vals = list(get_args(tp))
        kinds = {_JSON_TYPES.get(type(v), "string") for v in vals}
        out: dict[str, Any] = {"enum": vals}
        if len(kinds) == 1:
            out["type"] = kinds.pop()
        return out, False
    if origin in (list, tuple, set, frozenset, abc.Sequence):
        args = get_args(tp)
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _type_schema(args[0])[0]
        return out, False
    if origin is dict:
        return {"type": "object"}, False
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}, False
    if tp is Any or tp is inspect.Parameter.empty:
        return {}, False
    raise TypeError(f"tool schema: unsupported parameter type {tp!r} (use str, int, float, bool, list[...], "
                    f"dict, Literal[...] or Optional[...])")


_GOOGLE_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params)\s*:\s*$")
_GOOGLE_ITEM = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_REST_ITEM = re.compile(r"^\s*:param\s+(?:[\w\[\], |]+\s+)?(\w+)\s*:\s*(.*)$")
_OTHER_SECTION = re.compile(r"^\s*(Returns?|Raises|Yields|Examples?|Notes?)\s*:\s*$|^\s*:(returns?|rtype|raises?)\b")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google- or reST-style docstring.

    The description is the first paragraph. Google: items of an `Args:` section, continuation
    lines indented deeper than the items. reST: `:param [type] name: text`, continuations indented.
    """
    if not doc:
        return "", {}
    desc: list[str] = []
    params: dict[str, str] = {}
    section, current, item_indent = "desc", None, None
    for line in inspect.cleandoc(doc).splitlines():
        text, ind = line.strip(), len(line) - len(line.lstrip())
        if _GOOGLE_SECTION.match(line):
            section, current, item_indent = "args", None, None
        elif m := _REST_ITEM.match(line):
            section, current = "rest", m.group(1)
            params[current] = m.group(2).strip()
        elif _OTHER_SECTION.match(line):
            section, current = "other", None
        elif section == "desc":
            desc.append(line)
        elif not text:
            continue
        elif section == "args" and (m := _GOOGLE_ITEM.match(line)) and (item_indent is None or ind <= item_indent):
            item_indent, current = ind, m.group(1).lstrip("*")
            params[current] = m.group(3).strip()
        elif current is not None and (section == "args" or ind > 0):
            params[current] = f"{params[current]} {text}".strip()  # continuation line
        else:
            current = None
    first_para = "\n".join(desc).strip().split("\n\n")[0]
    return " ".join(x.strip() for x in first_para.splitlines()).strip(), params


# ---- tools -------------------------------------------------------------------------------------
@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any]
    timeout_s: float | None = 30.0

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                      timeout_s: float | None = 30.0) -> Tool:
        """A tool whose schema comes from `fn`'s type hints and docstring (Google or reST params)."""
        if not callable(fn):
            raise TypeError(f"Tool.from_function needs a callable, got {type(fn).__name__}")
        sig = inspect.signature(fn)
        hints = get_type_hints(fn)
        desc, pdocs = parse_docstring(fn.__doc__)
        props: dict[str, Any] = {}
        required: list[str] = []
        for pname, p in sig.parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"tool {fn.__name__}: *args/**kwargs cannot be described by a JSON schema")
            schema, optional = _type_schema(hints.get(pname, Any))
            if pname in pdocs:
                schema = {**schema, "description": pdocs[pname]}
            if p.default is not p.empty and p.default is not None:
                schema["default"] = p.default
            props[pname] = schema
            if p.default is p.empty and not optional:
                required.append(pname)
        params = {"type": "object", "properties": props, "required": required}
        return cls(name=name or fn.__name__, description=description if description is not None else desc,
                   parameters=params, fn=fn, timeout_s=timeout_s)

    def schema(self) -> dict[str, Any]:
        """OpenAI / Qwen chat-template format."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def validate(self, arguments: dict[str, Any]) -> str | None:
        """None when `arguments` fit the schema, else a one-line reason."""
        props, req = self.parameters.get("properties", {}), self.parameters.get("required", [])
        missing = [r for r in req if r not in arguments]
        if missing:
            return f"missing required argument(s) {missing}"
        unknown = [k for k in arguments if k not in props]
        if unknown:
            return f"unknown argument(s) {unknown}; expected {sorted(props)}"
        for k, v in arguments.items():
            why = _check(v, props[k])
            if why:
                return f"argument {k!r}: {why}"
        return None

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(self.fn):
            coro = self.fn(**arguments)
        else:
            coro = asyncio.to_thread(self.fn, **arguments)  # a slow tool never blocks the event loop
        return await asyncio.wait_for(coro, self.timeout_s) if self.timeout_s else await coro


def _check(v: Any, schema: dict[str, Any]) -> str | None:
    if "enum" in schema and v not in schema["enum"]:
        return f"{v!r} is not one of {schema['enum']}"
    if "anyOf" in schema:
        return None if any(_check(v, s) is None for s in schema["anyOf"]) else f"{v!r} matches no allowed type"
    t = schema.get("type")
    ok = {"string": lambda x: isinstance(x, str),
          "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
          "number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          "boolean": lambda x: isinstance(x, bool), "object": lambda x: isinstance(x, dict),
          "array": lambda x: isinstance(x, list)}.get(t)
    if ok is not None and not ok(v):
        return f"expected {t}, got {type(v).__name__} {v!r}"[:200]
    if t == "array" and "items" in schema:
        for x in v:
            if why := _check(x, schema["items"]):
                return f"item: {why}"
    return None


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout_s: float | None = 30.0) -> Any:
    """Decorator: `@tool` or `@tool(name=..., timeout_s=...)` turns a function into a `Tool`."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, timeout_s=timeout_s)
    return wrap(fn) if fn is not None else wrap


# ---- parsing -----------------------------------------------------------------------------------
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str | None
    arguments: dict[str, Any] | None
    raw: str
    error: str | None = None  # set when the call could not be parsed


def has_tool_call(text: str) -> bool:
    return TOOL_CALL_OPEN in text


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>...</tool_call>` in `text`, in order; unparseable ones carry `error`.

    An opening tag without its closing tag (a turn cut off mid-call) is one malformed call.
    `arguments` may be an object or a JSON string holding one (OpenAI style).
    """
    # str.find, not a lazy regex: a regex rescans to the end from every unclosed opening tag,
    # quadratic in a degenerate completion that repeats the tag
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
        end = text.find(TOOL_CALL_CLOSE, start + len(TOOL_CALL_OPEN))
        if end < 0:
            calls.append(ToolCall(None, None, text[start:], "unterminated <tool_call> (missing </tool_call>)"))
            break
        calls.append(_parse_one(text[start + len(TOOL_CALL_OPEN):end]))
        pos = end + len(TOOL_CALL_CLOSE)
    return calls


MAX_JSON_DEPTH = 200  # far past any real tool call; a fixed bound, not the interpreter's recursion limit


def _json_depth(raw: str) -> int:
    """Deepest `[`/`{` nesting outside JSON strings (one linear pass)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _loads(raw: str) -> Any:
    """`json.loads` whose every failure is a `ValueError`. Nesting is bounded by MAX_JSON_DEPTH
    before decoding: the decoder's own limit is the interpreter's recursion limit, which other
    libraries raise (torch.compile, sympy), so a model emitting ~1000 `[` would either crash the
    rollout with RecursionError or parse, depending on what ran before."""
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _parse_one(body: str) -> ToolCall:
    raw = body.strip()
    try:
        obj = _loads(raw)
    except json.JSONDecodeError as e:
        return ToolCall(None, None, raw, f"invalid JSON in tool call: {e.msg} at char {e.pos}")
    except ValueError as e:
        return ToolCall(None, None, raw, f"invalid JSON in tool call: {e}")
    if not isinstance(obj, dict):
        return ToolCall(None, None, raw, "a tool call must be a JSON object {\"name\": ..., \"arguments\": {...}}")
    name, args = obj.get("name"), obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return ToolCall(None, None, raw, "tool call without a \"name\" string")
    if isinstance(args, str):
        try:
            args = _loads(args) if args.strip() else {}
        except ValueError:  # JSONDecodeError is one
            return ToolCall(name, None, raw, "\"arguments\" is a string that is not a JSON object")
    if not isinstance(args, dict):
        return ToolCall(name, None, raw, "\"arguments\" must be a JSON object")
    return ToolCall(name, args, raw)


# ---- registry & execution ----------------------------------------------------------------------
@dataclass
class ToolCallStats:
    ok: int = 0
    malformed: int = 0
    errored: int = 0
    sandbox_limit_hits: int = 0

    def add(self, other: ToolCallStats) -> None:
        self.ok += other.ok
        self.malformed += other.malformed
        self.errored += other.errored
        self.sandbox_limit_hits += other.sandbox_limit_hits

    def as_dict(self) -> dict[str, int]:
        return {"ok": self.ok, "malformed": self.malformed, "errored": self.errored,
                "sandbox_limit_hits": self.sandbox_limit_hits}


@dataclass
class ToolResult:
    call: ToolCall
    text: str
    status: Literal["ok", "malformed", "errored"]
    metadata: dict[str, Any] = field(default_factory=dict)


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), max_result_chars: int = 4000):
        self.tools: dict[str, Tool] = {}
        self.max_result_chars = max_result_chars
        for t in tools:
            self.register(t)

    def register(self, t: Tool | Callable[..., Any]) -> Tool:
        t = t if isinstance(t, Tool) else Tool.from_function(t)
        if t.name in self.tools:
            raise ValueError(f"tool {t.name!r} registered twice")
        self.tools[t.name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    async def execute(self, call: ToolCall) -> ToolResult:
        if call.error is not None:
            return ToolResult(call, f"Error: {call.error}", "malformed")
        t = self.tools.get(call.name or "")
        if t is None:
            return ToolResult(call, f"Error: unknown tool {call.name!r}; available: {sorted(self.tools)}",
                              "malformed")
        why = t.validate(call.arguments or {})
        if why:
            return ToolResult(call, f"Error: bad arguments for {t.name}: {why}", "malformed")
        try:
            out = await t(call.arguments or {})
        except TimeoutError:
            return ToolResult(call, f"Error: {t.name} timed out after {t.timeout_s}s", "errored")
        except InfraError:
            raise  # the machinery failed (e.g. the sandbox could not start): not the model's observation
        except Exception as e:  # noqa: BLE001 - any tool failure is an observation, not a crash
            return ToolResult(call, f"Error: {t.name} raised {type(e).__name__}: {e}"[: self.max_result_chars],
                              "errored")
        text, meta = _format_result(out)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + f"... [{len(text) - self.max_result_chars} chars truncated]"
        return ToolResult(call, text, "ok", meta)

    async def run_calls(self, text: str) -> tuple[list[ToolResult], ToolCallStats]:
        """Parse and execute every call in `text` (concurrently); results in call order."""
        calls = parse_tool_calls(text)
        results = list(await asyncio.gather(*(self.execute(c) for c in calls)))
        stats = ToolCallStats()
        for r in results:
            setattr(stats, r.status, getattr(stats, r.status) + 1)
            if r.metadata.get("sandbox_limit_hit"):
                stats.sandbox_limit_hits += 1
        return results, stats


def _format_result(out: Any) -> tuple[str, dict[str, Any]]:
    from forge.envs.sandbox import SandboxResult

    if isinstance(out, SandboxResult):
        return format_sandbox_result(out), {"sandbox_limit_hit": out.limit_hit, "exit_code": out.exit_code}
    if isinstance(out, str):
        return out, {}
    if isinstance(out, (dict, list, int, float, bool)) or out is None:
        return json.dumps(out), {}
    return str(out), {}


def format_sandbox_result(r: Any) -> str:
    """A compact text for the model: stdout, then stderr / exit status only when relevant."""
    parts = [r.stdout.rstrip("\n")] if r.stdout.strip() else []
    if r.stderr.strip():
        parts.append("stderr:\n" + r.stderr.rstrip("\n")[-2000:])
    if r.limit_hit:
        parts.append(f"[killed: {r.limit_hit} limit]")
    elif r.exit_code != 0:
        parts.append(f"[exit code {r.exit_code}]")
    return "\n".join(parts) if parts else "(no output)"


__all__ = ["Tool", "ToolCall", "ToolCallStats", "ToolRegistry", "ToolResult", "format_sandbox_result",
           "has_tool_call", "parse_docstring", "parse_tool_calls", "tool"]
