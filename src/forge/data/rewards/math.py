"""`MathReward`: is the response's final answer equal to the target? (math-verify decides)

The answer is read from `<answer>...</answer>` (`answer: last` (default) or `first`, which is
torchforge's choice), else the last `\\boxed{}` (nested braces), else `#### x`, else the last
number; an extracted answer over `max_answer_chars` (default 1000) is no answer (math-verify's
parse time grows superlinearly with it). Only the last `max_chars` characters of a response are
read (default 20000): answers come at the end, and a degenerate 100k-character rollout must not
cost more than a normal one.

Plain numbers (`$`, `,` and spaces stripped; scientific notation read: "1e6" == "1000000") are
compared directly: exactly when the target is an integer (off by one is wrong, however large the
number: torchforge's absolute tolerance, not a relative one), else within an absolute
`tolerance` (default 1e-6, torchforge's: |pred - target| < tolerance). Anything else goes
through `math_verify.parse`/`verify`, so "1/2", "0.5" and "\\frac{1}{2}" agree. There is no
partial credit: torchforge's substring match gave target "4" credit for "42", which RL happily
learns to exploit.

Time: math-verify's own timeout uses SIGALRM (main thread only) and turns a timeout into "not
equal", i.e. a silent 0.0. forge turns it off explicitly and bounds the whole reward call itself
(`forge.actors.RewardActor`: a worker process killed at `timeout_s`, counted as an infrastructure
failure, never a score).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from forge.config.registry import register
from forge.data.formats import ANSWER_PICKS, extract_answer, extract_boxed, extract_gsm8k, normalize_number, tail

DEFAULT_MAX_CHARS = 20_000


def _gold(target: str) -> str:
    """A raw dataset answer works as a target too: take its `####` / `\\boxed{}` answer."""
    t = str(target)
    return extract_gsm8k(t) or extract_boxed(t) or t.strip()


def _quiet_math_verify() -> None:
    """math-verify warns once per process that its timeout is off; forge turns it off on purpose
    (the caller bounds the time, see the module docstring), so the warning is noise."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True


def _mv_parse(text: str) -> list:
    from math_verify import parse

    inner = text.strip().strip("$")
    return parse(f"${inner}$", parsing_timeout=None) or parse(text, parsing_timeout=None)


def _is_integer(canonical: str) -> bool:
    return "." not in canonical and "E" not in canonical


def math_equal(pred: str, gold: str, *, tolerance: float = 1e-6) -> bool:
    """Equivalence of two answer strings: the numeric fast path (integers exactly, others within
    the absolute `tolerance`), then math-verify."""
    a, b = normalize_number(pred), normalize_number(gold)
    if a is not None and b is not None:
        if _is_integer(b) or a == b:
            return a == b
        return abs(Decimal(a) - Decimal(b)) < Decimal(repr(float(tolerance)))
    from math_verify import verify

    _quiet_math_verify()
    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


@register("reward", "math", "MathReward")
@dataclass
class MathReward:
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    tolerance: float = 1e-6  # absolute, for non-integer targets; integer targets compare exactly
    answer: str = "last"  # which <answer> tag counts: "last" (forge) or "first" (torchforge)
    max_chars: int | None = DEFAULT_MAX_CHARS  # read only the response's last N characters (None: all)
    max_answer_chars: int = 1000  # a longer extracted "answer" is no answer: incorrect, not sent to math-verify

    name = "math"

    def __post_init__(self) -> None:
        if self.answer not in ANSWER_PICKS:
            raise ValueError(f"MathReward: answer must be one of {ANSWER_PICKS}, got {self.answer!r}")
        if not self.tolerance >= 0:
            raise ValueError(f"MathReward: tolerance must be >= 0 (absolute), got {self.tolerance!r}")
        if self.max_chars is not None and self.max_chars <= 0:
            raise ValueError(f"MathReward: max_chars must be > 0 or None, got {self.max_chars!r}")

    def __call__(self, prompt: str, response: str, target: str) -> float:
        pred = extract_answer(tail(response or "", self.max_chars), self.answer)  # type: ignore[arg-type]
        if pred is None or len(pred) > self.max_answer_chars:
            return self.incorrect_reward
        return self.correct_reward if math_equal(pred, _gold(target), tolerance=self.tolerance) \
            else self.incorrect_reward
