"""Code execution for agents and rewards, on top of `forge.envs.sandbox`.

- `python_tool(config)`: a `python(code)` tool; the model sees stdout / stderr / the limit hit.
- `CodeReward`: `reward(prompt, response, target) -> float`, the fraction of the task's tests
  (assert statements) that pass against the code in the response (its last ```python block,
  else its <answer>...</answer>, else the whole response when it defines something).

Neither catches `forge.errors.InfraError` from the sandbox (interpreter missing or not runnable
inside, bwrap error, start-up timeout): an infrastructure failure propagates to the caller (the
reward actor / rollout marks the episode failed) instead of scoring 0.0 like a wrong answer.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.config.registry import register
from forge.data.formats import extract_answer_tag
from forge.envs.sandbox import SandboxConfig, SandboxResult, arun_python, run_python
from forge.envs.tools import Tool

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str | None:
    """The code a completion submits, or None when it has none."""
    blocks = _FENCE.findall(response)
    if blocks:
        return blocks[-1].strip("\n")
    inner = extract_answer_tag(response, "last")  # linear in unclosed tags, unlike a lazy regex
    if inner is not None:
        blocks = _FENCE.findall(inner)
        return (blocks[-1] if blocks else inner).strip("\n")
    if re.search(r"^\s*(def|class|import|from)\s", response, re.MULTILINE):
        return response.strip("\n")
    return None


@register("tool", "python")
def python_tool(config: SandboxConfig | dict | str | None = None, *, name: str = "python") -> Tool:
    """A tool that runs Python in the sandbox and returns its output (a `SandboxResult`)."""
    cfg = SandboxConfig.from_spec(config)

    async def python(code: str) -> SandboxResult:
        return await arun_python(code, config=cfg)

    return Tool(name=name, description="Run a Python 3 program in a sandbox (no network, no files outside its "
                                       "working directory) and return what it prints.",
                parameters={"type": "object", "properties": {"code": {"type": "string", "description":
                                                                      "the complete program; print what you need"}},
                            "required": ["code"]},
                fn=python, timeout_s=None)  # the sandbox enforces its own wall clock


def parse_tests(target: Any) -> list[str]:
    """Tests from a target: a list of assert strings, {"tests": [...]}, or a JSON / newline string."""
    if isinstance(target, dict):
        target = target.get("tests", target.get("test_list"))
    if isinstance(target, str):
        s = target.strip()
        if s.startswith(("[", "{")):
            try:
                return parse_tests(json.loads(s))
            except json.JSONDecodeError:
                pass
        return [ln for ln in s.splitlines() if ln.strip()]
    if isinstance(target, Sequence) and all(isinstance(t, str) for t in target):
        return [t for t in target if t.strip()]
    raise ValueError(f"CodeReward: target must be a list of test statements (or JSON of one), got {target!r:.200}")


_HARNESS = """
import sys as _s
_src = {code!r}
_tests = {tests!r}
_g = {{"__name__": "__main__"}}
try:
    exec(compile(_src, "solution.py", "exec"), _g)
except BaseException as _e:
    _s.stderr.write(f"solution failed: {{type(_e).__name__}}: {{_e}}\\n")
    _s.exit(3)
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, f"test_{{_i}}", "exec"), dict(_g))
        print("{nonce}", _i, "PASS", flush=True)
    except BaseException as _e:
        print("{nonce}", _i, "FAIL", type(_e).__name__, flush=True)
"""


@dataclass
class CodeReward:
    """Fraction of tests passing. `isolate_tests=True` runs each test in its own sandbox (slower,
    but one test's crash or hang cannot take the others down); otherwise one sandbox runs them all."""

    sandbox: SandboxConfig | dict | str | None = None
    isolate_tests: bool = False
    last_results: list[SandboxResult] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.sandbox = SandboxConfig.from_spec(self.sandbox)

    def __call__(self, prompt: str, response: str, target: Any) -> float:
        """Raises `InfraError` (never returns 0.0) when the sandbox itself fails."""
        tests = parse_tests(target)
        code = extract_code(response)
        if code is None or not tests:
            self.last_results = []
            return 0.0
        if self.isolate_tests:
            self.last_results = [run_python(f"{code}\n\n{t}\n", config=self.sandbox) for t in tests]
            return sum(r.ok for r in self.last_results) / len(tests)
        nonce = "FORGE_" + secrets.token_hex(8)  # the solution cannot forge a PASS line
        r = run_python(_HARNESS.format(code=code, tests=tests, nonce=nonce), config=self.sandbox)
        self.last_results = [r]
        passed = set()
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == nonce and parts[2] == "PASS":
                passed.add(int(parts[1]))
        return len(passed) / len(tests)

    @property
    def limit_hits(self) -> int:
        return sum(r.limit_hit is not None for r in self.last_results)


__all__ = ["CodeReward", "extract_code", "parse_tests", "python_tool"]
