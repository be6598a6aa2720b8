"""Built-in environment tasks a tiny CPU model can learn, generated in code with train/test splits.

- `calculator` (multi-turn, tools): multiply (or add/subtract) big numbers. The model calls the
  calculator tool, reads its answer, and answers:

      user:      4821*37
      assistant: <tool_call>{"name":"calculator","arguments":{"expression":"4821*37"}}</tool_call>
      tool:      178377
      assistant: <answer>178377</answer>

  reward 1 for the right final answer. `difficulty` = operand digits. The gold demonstration
  (`gold_turns`, `gold_trajectory`) is that exact exchange, for SFT warm-up.
- `coding` (single- or multi-turn with the `python` tool): write a small function
  ("Write a Python function f(x) that returns x*7+3."), scored by `CodeReward` — the fraction
  of its asserts that pass in the sandbox. `difficulty` 1-3 picks the function family.

Both are `forge.data.tasks.Task`s (`sample(split, index)`, `as_dataset`, disjoint seeded splits).
"""

from __future__ import annotations

import ast
import asyncio
import json
import operator
import random
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from forge.config.registry import register
from forge.data.tasks.base import Task, response_answer
from forge.envs.base import register_env
from forge.envs.code import CodeReward
from forge.envs.rollout import run_episode, scripted_generate_fn
from forge.envs.tool_env import ToolEnvironment
from forge.envs.tools import Tool

# ---- the calculator tool -------------------------------------------------------------------------
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_MAX_ABS = 10**40


def calculate(expression: str) -> int | float:
    """Value of + - * / // % ( ) over int/float literals; ValueError for anything else."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be a string of at most 200 characters")
    try:
        with warnings.catch_warnings():  # model output like "3(4)" would print a SyntaxWarning per call
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from e

    def ev(n: ast.AST) -> int | float:
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            v = _BIN[type(n.op)](ev(n.left), ev(n.right))  # ZeroDivisionError propagates: the model sees it
            if abs(v) > _MAX_ABS:
                raise ValueError("result too large")
            return v
        raise ValueError(f"unsupported element in expression: {type(n).__name__}")

    v = ev(tree.body)
    return int(v) if isinstance(v, float) and v.is_integer() else v


@register("tool", "calculator")
def calculator_tool(sandbox: Any = None) -> Tool:
    """The calculator tool (runs in-process: `sandbox`, the env's sandbox config, is not needed)."""
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: numbers with + - * / // % and parentheses, e.g. "123*45".
        """
        return str(calculate(expression))

    return Tool.from_function(calculator, timeout_s=5.0)


# ---- calculator task ---------------------------------------------------------------------------
@register("task", "calculator", "CalculatorTask")
@dataclass
class CalculatorTask(Task):
    difficulty: int = 3  # digits of each operand
    min_digits: int = 2
    ops: str = "*"  # any of "+-*"
    answer_format: str = "tag"
    system_prompt: str | None = None

    name: ClassVar[str] = "calculator"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_digits <= self.difficulty:
            raise ValueError(f"calculator: need 1 <= min_digits ({self.min_digits}) <= difficulty ({self.difficulty})")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"calculator: ops {self.ops!r} must be a non-empty string of '+', '-', '*'")

    def draw(self, rng: random.Random) -> dict[str, Any]:
        a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in
                (rng.randint(self.min_digits, self.difficulty), rng.randint(self.min_digits, self.difficulty)))
        op = rng.choice(self.ops)
        if op == "-" and b > a:
            a, b = b, a
        expr = f"{a}{op}{b}"
        value = str(calculate(expr))
        return {"key": expr, "prompt": expr, "target": value, "solution": value, "expression": expr}

    def verify(self, response: str, target: str) -> float:
        return 1.0 if response_answer(response) == str(target).strip() else 0.0

    def gold_turns(self, sample: dict[str, Any]) -> list[str]:
        """The ideal model turns (without end-of-turn tokens): the tool call, then the answer."""
        call = json.dumps({"name": "calculator", "arguments": {"expression": sample["expression"]}},
                          separators=(",", ":"))
        return [f"<tool_call>{call}</tool_call>", f"<answer>{sample['target']}</answer>"]

    def sft_completion(self, sample: dict[str, Any]) -> str:
        """The gold exchange after the prompt, in ChatML (Qwen) form; `gold_trajectory` renders it
        with any tokenizer's own template and gives the loss mask too."""
        t1, t2 = self.gold_turns(sample)
        return (f"{t1}<|im_end|>\n<|im_start|>user\n<tool_response>\n{sample['target']}\n</tool_response>"
                f"<|im_end|>\n<|im_start|>assistant\n{t2}")


# ---- coding task -------------------------------------------------------------------------------
# (difficulty, arity, expression over x / (a, b) with a constant c)
_FUNCS: list[tuple[int, int, str]] = [
    (1, 1, "x+{c}"), (1, 1, "x-{c}"), (1, 1, "x*{c}"),
    (2, 1, "x*{c}+{d}"), (2, 1, "x*x+{c}"), (2, 1, "max(x, {c})"), (2, 1, "min(x, {c})"),
    (3, 2, "a*b+{c}"), (3, 2, "(a+b)*{c}"), (3, 2, "abs(a-b)+{c}"), (3, 2, "max(a, b)*{c}"),
]
_NAMES = ["f", "g", "h", "calc", "solve", "compute", "transform", "score"]


@register("task", "coding", "CodingTask")
@dataclass
class CodingTask(Task):
    difficulty: int = 1  # 1: x+c style, 2: two-step / max / min, 3: two arguments
    num_tests: int = 3
    answer_format: str = "tag"
    system_prompt: str | None = None

    name: ClassVar[str] = "coding"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.difficulty <= 3:
            raise ValueError(f"coding: difficulty must be 1, 2 or 3, got {self.difficulty}")
        if self.num_tests < 1:
            raise ValueError(f"coding: num_tests must be >= 1, got {self.num_tests}")

    def draw(self, rng: random.Random) -> dict[str, Any]:
        _, arity, tmpl = rng.choice([f for f in _FUNCS if f[0] <= self.difficulty])
        name = rng.choice(_NAMES)
        expr = tmpl.format(c=rng.randint(1, 9), d=rng.randint(1, 9))
        args = "x" if arity == 1 else "a, b"
        fn = eval(f"lambda {args}: {expr}")  # noqa: S307 - our own template, not model output
        tests = []
        for _ in range(self.num_tests):
            xs = [rng.randint(-20, 20) for _ in range(arity)]
            tests.append(f"assert {name}({', '.join(map(str, xs))}) == {fn(*xs)}")
        code = f"def {name}({args}):\n    return {expr}"
        prompt = f"Write a Python function {name}({args}) that returns {expr}."
        return {"key": f"{name}|{args}|{expr}", "prompt": prompt, "target": json.dumps(tests),
                "solution": f"```python\n{code}\n```", "tests": tests, "function": name}

    def verify(self, response: str, target: str) -> float:
        return CodeReward()("", response, target)

    def sft_completion(self, sample: dict[str, Any]) -> str:
        return sample["solution"]

    def gold_turns(self, sample: dict[str, Any]) -> list[str]:
        return [sample["solution"]]


# ---- environments ------------------------------------------------------------------------------
@register_env("calculator")
class CalculatorEnv(ToolEnvironment):
    """The calculator tool task. `include_tool_schemas=False` (default) keeps the prompt to the bare
    expression so a tiny model learns the format from the gold demonstrations; set True for chat
    models that should read the tool's JSON schema in the system prompt."""

    def __init__(self, difficulty: int = 3, min_digits: int = 2, ops: str = "*", seed: int = 0,
                 test_fraction: float = 0.1, max_turns: int = 3, include_tool_schemas: bool = False,
                 system_prompt: str | None = None):
        task = CalculatorTask(seed=seed, test_fraction=test_fraction, difficulty=difficulty, min_digits=min_digits,
                              ops=ops)
        super().__init__(tools=[calculator_tool()], task=task, max_turns=max_turns, system_prompt=system_prompt,
                         include_tool_schemas=include_tool_schemas)


@register_env("coding")
class CodingEnv(ToolEnvironment):
    """Write a function; reward = fraction of its tests passing in the sandbox. With
    `python_tool=True` the model may run code (`python` tool) before answering."""

    def __init__(self, difficulty: int = 1, num_tests: int = 3, seed: int = 0, test_fraction: float = 0.1,
                 max_turns: int = 1, python_tool: bool = False, sandbox: Any = None,
                 include_tool_schemas: bool = True, system_prompt: str | None = None):
        task = CodingTask(seed=seed, test_fraction=test_fraction, difficulty=difficulty, num_tests=num_tests)
        self.code_reward = CodeReward(sandbox=sandbox)
        super().__init__(tools=["python"] if python_tool else [], task=task,
                         max_turns=max(max_turns, 2) if python_tool else max_turns, system_prompt=system_prompt,
                         include_tool_schemas=include_tool_schemas, sandbox=sandbox)

    async def step(self, action: str):
        obs = await super().step(action)
        if obs.done and obs.metadata.get("stop_reason") == "answer":
            # the final answer's tests run in the sandbox too: count its limit hits
            obs.metadata["tool_calls"] = {"sandbox_limit_hits": self.code_reward.limit_hits}
        return obs

    def score(self, response: str) -> float:
        return self.code_reward(self._prompt, response, self._target)


# ---- gold demonstrations -----------------------------------------------------------------------
async def agold_trajectory(env: ToolEnvironment, sample: dict[str, Any], tokenizer: Any, **kw: Any):
    """The gold multi-turn exchange as a `Trajectory` (token ids, loss mask), through the real rollout."""
    turns = env.task.gold_turns(sample)
    kw.setdefault("max_turns", len(turns))
    kw.setdefault("max_total_tokens", 1 << 16)
    return await run_episode(scripted_generate_fn(tokenizer, turns), env, sample, tokenizer, **kw)


def gold_trajectory(env: ToolEnvironment, sample: dict[str, Any], tokenizer: Any, **kw: Any):
    """Sync `agold_trajectory` (not from inside a running event loop)."""
    return asyncio.run(agold_trajectory(env, sample, tokenizer, **kw))


__all__ = ["CalculatorEnv", "CalculatorTask", "CodingEnv", "CodingTask", "agold_trajectory",
           "calculate", "calculator_tool", "gold_trajectory"]
