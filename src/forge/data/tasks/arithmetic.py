"""Multi-digit arithmetic ("12+7=" -> "19"): the built-in task a ~1M-parameter model can learn.

The prompt is short and every digit is one token of forge's tiny tokenizer. `difficulty` is the
largest operand size in digits; each operand's size is drawn uniformly from
`min_digits..difficulty`, so a run mixes easy and hard problems (a tiny model gets the easy
ones first — partial accuracy that RL can push up). `reverse=True` writes the answer's digits
least-significant first, the order in which a left-to-right model can carry; the target is then
the reversed string.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from forge.config.registry import register
from forge.data.tasks.base import Task, response_answer

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@register("task", "arithmetic", "ArithmeticTask")
@dataclass
class ArithmeticTask(Task):
    difficulty: int = 2  # max digits per operand
    min_digits: int = 1
    ops: str = "+"  # any of "+-*"
    num_operands: int = 2
    reverse: bool = False

    name: ClassVar[str] = "arithmetic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_digits <= self.difficulty:
            raise ValueError(f"arithmetic: need 1 <= min_digits ({self.min_digits}) <= difficulty "
                             f"({self.difficulty})")
        bad = set(self.ops) - set(_APPLY)
        if not self.ops or bad:
            raise ValueError(f"arithmetic: ops {self.ops!r} must be a non-empty string of '+', '-', '*'")
        if self.num_operands < 2:
            raise ValueError(f"arithmetic: num_operands must be >= 2, got {self.num_operands}")

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.difficulty)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        while True:
            nums = [self._operand(rng) for _ in range(self.num_operands)]
            op = rng.choice(self.ops)
            if op == "-":  # bigger first: fewer negative answers
                nums.sort(reverse=True)
            value = nums[0]
            for x in nums[1:]:
                value = _APPLY[op](value, x)
            if value >= 0:  # no minus sign in answers: one symbol less for a tiny model to learn
                break
        expr = op.join(str(x) for x in nums)
        answer = str(value)
        target = answer[::-1] if self.reverse else answer
        return {"key": expr, "prompt": f"{expr}=", "target": target, "solution": target,
                "answer": value, "operands": nums, "op": op}

    def verify(self, response: str, target: str) -> float:
        return 1.0 if response_answer(response) == str(target).strip() else 0.0
