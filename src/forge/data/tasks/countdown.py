"""Countdown: reach a target from given numbers with + - * ("3 5 7 -> 22" : "3*5+7").

Every problem is solvable by construction (the target is the value of a random expression
over the numbers). `difficulty` is how many numbers are given; `max_number` bounds them. By
default each number may be used at most once (`use_all=True`: exactly once, as in TinyZero).
The target string carries the numbers ("22 from 3,5,7") so `verify(response, target)` can
check an answer on its own. Answers are checked by evaluating a parsed AST (ints, + - *, and
parentheses only), never with `eval`.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from forge.config.registry import register
from forge.data.tasks.base import Task, response_answer

_PREC = {"+": 1, "-": 1, "*": 2}
_TARGET = re.compile(r"^\s*(-?\d+)\s+from\s+(\d+(?:\s*,\s*\d+)*)\s*$")
_MAX_EXPR_CHARS = 200  # far longer than any real answer; bounds the work of a hostile one


def parse_countdown_target(target: str) -> tuple[int, list[int]]:
    m = _TARGET.match(str(target))
    if not m:
        raise ValueError(f"countdown target {target!r}: expected '<target> from <n1>,<n2>,...'")
    return int(m.group(1)), [int(x) for x in m.group(2).split(",")]


def safe_eval(expr: str) -> tuple[int, list[int]]:
    """Value of an expression of non-negative ints with + - * and parentheses, and the ints used.

    ValueError for anything else (names, calls, division, powers, floats...).
    """
    if len(expr) > _MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    tree = ast.parse(expr, mode="eval")
    used: list[int] = []

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            return a * b
        raise ValueError(f"not allowed in an answer: {ast.dump(node)[:60]}")

    return ev(tree.body), used


@register("task", "countdown", "CountdownTask")
@dataclass
class CountdownTask(Task):
    difficulty: int = 3  # how many numbers are given
    max_number: int = 10
    ops: str = "+-*"
    use_all: bool = False
    max_target: int = 1000

    name: ClassVar[str] = "countdown"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.difficulty < 2:
            raise ValueError(f"countdown: difficulty (count of numbers) must be >= 2, got {self.difficulty}")
        if self.max_number < 1:
            raise ValueError(f"countdown: max_number must be >= 1, got {self.max_number}")
        if not self.ops or set(self.ops) - set(_PREC):
            raise ValueError(f"countdown: ops {self.ops!r} must be a non-empty string of '+', '-', '*'")

    def _expression(self, rng: random.Random, nums: list[int]) -> tuple[str, int]:
        # Combine two random pool items until one is left; parenthesise only where needed.
        pool: list[tuple[str, int, int]] = [(str(n), n, 3) for n in nums]  # (text, value, precedence)
        while len(pool) > 1:
            a = pool.pop(rng.randrange(len(pool)))
            b = pool.pop(rng.randrange(len(pool)))
            op = rng.choice(self.ops)
            p = _PREC[op]
            ta = f"({a[0]})" if a[2] < p else a[0]
            tb = f"({b[0]})" if b[2] < p or (b[2] == p and op == "-") else b[0]
            value = {"+": a[1] + b[1], "-": a[1] - b[1], "*": a[1] * b[1]}[op]
            pool.append((f"{ta}{op}{tb}", value, p))
        return pool[0][0], pool[0][1]

    def draw(self, rng: random.Random) -> dict[str, Any]:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.difficulty)]
            k = self.difficulty if self.use_all else rng.randint(2, self.difficulty)
            expr, value = self._expression(rng, rng.sample(nums, k))
            if 0 < value <= self.max_target:
                break
        shown = " ".join(map(str, nums))
        return {"key": f"{shown}>{value}", "prompt": f"{shown}->{value}:",
                "target": f"{value} from {','.join(map(str, nums))}", "solution": expr,
                "numbers": nums, "goal": value}

    def verify(self, response: str, target: str) -> float:
        goal, nums = parse_countdown_target(target)
        expr = response_answer(response).split("=", 1)[0].strip()  # "3*5+7=22" is fine too
        try:
            value, used = safe_eval(expr)
        except (ValueError, SyntaxError, RecursionError):
            return 0.0
        have, need = Counter(nums), Counter(used)
        if any(need[x] > have[x] for x in need):
            return 0.0
        if self.use_all and need != have:
            return 0.0
        return 1.0 if value == goal else 0.0
