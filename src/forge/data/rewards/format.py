"""Format and length rewards: `ThinkingReward`, `FormatReward`, `LengthPenalty` (DAPO overlong)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from forge.config.registry import register


@register("reward", "thinking", "ThinkingReward")
@dataclass
class ThinkingReward:
    """`full_reward` for a non-empty `<think>...</think>`, `partial_reward` for a bare or empty
    tag, 0 for none. Tags are case- and space-tolerant (`< THINK >`, `</ think>`)."""

    partial_reward: float = 0.2
    full_reward: float = 1.0
    tag: str = "think"

    name = "thinking"

    def __post_init__(self) -> None:
        t = re.escape(self.tag)
        # `<\s*(/\s*)?tag\s*>`: one way to match each whitespace run (a `\s*/?\s*` would try every split
        # of a long run: quadratic on a degenerate rollout)
        self._tags = re.compile(rf"<\s*(/\s*)?{t}\s*>", re.IGNORECASE)

    def __call__(self, prompt: str, response: str, target: Any = None) -> float:
        # One pass over the tags, pairing them as the lazy `<think>(.*?)</think>` of torchforge does
        # (an open tag inside an open block is content); linear even with thousands of unclosed tags.
        response = response or ""
        seen = False
        open_end: int | None = None
        for m in self._tags.finditer(response):
            seen = True
            if m.group(1) is None:
                if open_end is None:
                    open_end = m.end()
            elif open_end is not None:
                if response[open_end:m.start()].strip():
                    return self.full_reward
                open_end = None
        return self.partial_reward if seen else 0.0


@register("reward", "format", "FormatReward")
@dataclass
class FormatReward:
    """`reward` when the response matches `pattern` (default: has an `<answer>` tag), else `penalty`.

    `fullmatch=True` demands that the whole (stripped) response matches.
    """

    # no `<answer>` between the tags: each start scans only to the next `<answer>`, so unclosed tags cost
    # linear time; for `search` it matches exactly when `<answer>.*?</answer>` does
    pattern: str = r"<answer>(?:(?!<answer>).)*?</answer>"
    reward: float = 1.0
    penalty: float = 0.0
    fullmatch: bool = False
    flags: int = re.DOTALL | re.IGNORECASE

    name = "format"

    def __post_init__(self) -> None:
        try:
            self._re = re.compile(self.pattern, self.flags)
        except re.error as e:
            raise ValueError(f"FormatReward: pattern {self.pattern!r} is not a valid regex: {e}") from e

    def __call__(self, prompt: str, response: str, target: Any = None) -> float:
        text = (response or "").strip()
        hit = self._re.fullmatch(text) if self.fullmatch else self._re.search(text)
        return self.reward if hit else self.penalty


@register("reward", "length", "overlong", "LengthPenalty", "LengthReward")
@dataclass
class LengthPenalty:
    """DAPO's soft overlong punishment: 0 up to `max_length - buffer`, then linearly down to
    `-penalty` at `max_length`, and `-penalty` beyond. Length in characters, or in tokens when a
    `tokenizer` (object or local path) is given."""

    max_length: int = 1024
    buffer: int = 256
    penalty: float = 1.0
    tokenizer: Any = field(default=None, repr=False)

    name = "length"

    def __post_init__(self) -> None:
        if not 0 <= self.buffer <= self.max_length:
            raise ValueError(f"LengthPenalty: need 0 <= buffer ({self.buffer}) <= max_length ({self.max_length})")

    def length(self, response: str) -> int:
        if self.tokenizer is None:
            return len(response)
        if isinstance(self.tokenizer, str):
            from forge.models.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        return len(self.tokenizer.encode(response, add_special_tokens=False))

    def __call__(self, prompt: str, response: str, target: Any = None) -> float:
        n = self.length(response or "")
        soft_start = self.max_length - self.buffer
        if n <= soft_start:
            return 0.0
        if n > self.max_length:
            return -self.penalty
        return -self.penalty * (n - soft_start) / max(self.buffer, 1)


LengthReward = LengthPenalty
