"""`MathReward`: is the response's final answer equal to the target? (math-verify decides)

The answer is read from `<answer>...</answer>`, else the last `\\boxed{}` (nested braces),
else `#### x`, else the last number. Plain numbers are compared directly (`$`, `,` and spaces
stripped; a relative tolerance); anything else goes through `math_verify.parse`/`verify`, so
"1/2", "0.5" and "\\frac{1}{2}" agree. There is no partial credit: torchforge's substring
match gave target "4" credit for "42", which RL happily learns to exploit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from forge.data.formats import extract_answer, extract_boxed, extract_gsm8k, normalize_number


def _gold(target: str) -> str:
    """A raw dataset answer works as a target too: take its `####` / `\\boxed{}` answer."""
    t = str(target)
    return extract_gsm8k(t) or extract_boxed(t) or t.strip()


def _mv_parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    kw = {} if timeout else {"parsing_timeout": None}
    inner = text.strip().strip("$")
    return parse(f"${inner}$", **kw) or parse(text, **kw)


def math_equal(pred: str, gold: str, *, rel_tol: float = 1e-6) -> bool:
    """Equivalence of two answer strings: the numeric fast path, then math-verify."""
    a, b = normalize_number(pred), normalize_number(gold)
    if a is not None and b is not None:
        return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=rel_tol)
    from math_verify import verify

    # math-verify times itself out with SIGALRM, which only works on the main thread; elsewhere
    # (RewardActor runs rewards in worker threads) the caller's own timeout bounds it.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    g, p = _mv_parse(gold, timeout), _mv_parse(pred, timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout))


@dataclass
class MathReward:
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    rel_tol: float = 1e-6

    name = "math"

    def __call__(self, prompt: str, response: str, target: str) -> float:
        pred = extract_answer(response or "")
        if pred is None:
            return self.incorrect_reward
        return self.correct_reward if math_equal(pred, _gold(target), rel_tol=self.rel_tol) \
            else self.incorrect_reward
