"""Answer extraction shared by dataset targets and rewards.

GSM8K writes its final answer after `#### `; MATH puts it in `\\boxed{...}` (braces may nest);
RL prompts often ask for `<answer>...</answer>`. These helpers pull the answer text out; they
never judge equivalence (that is `forge.data.rewards.MathReward`'s job).

Every extractor is linear in the text (one pass over its tags/braces): a degenerate rollout
(100k characters of unclosed `\\boxed{` or `<answer>`) costs milliseconds, not the reward's
whole timeout. Rewards additionally bound the text they look at (`max_chars`, the last N).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Literal

AnswerPick = Literal["first", "last"]
ANSWER_PICKS = ("first", "last")

_ANSWER_TOKENS = re.compile(r"<(/?)answer>", re.IGNORECASE)
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
# A number as people write it: optional sign, thousands separators, decimals, an exponent, a fraction.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|-?\.\d+(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_BRACES = re.compile(r"[{}]")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
# |exponent| above this is written in scientific form (writing 1e999999 out in full would cost a megabyte)
_MAX_FIXED_EXPONENT = 100


def tail(text: str, max_chars: int | None) -> str:
    """The last `max_chars` characters of `text` (all of it when `max_chars` is None): what a reward
    looks at. Answers come at the end of a completion, so a long degenerate prefix is dropped."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[-max_chars:]


def _matching_braces(text: str) -> dict[int, int]:
    """{index of `{`: index of its matching `}`} for every brace that closes, in one pass."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:  # a `}` with nothing open closes nothing
            match[stack.pop()] = m.start()
    return match


def extract_boxed(text: str) -> str | None:
    """The content of the LAST `\\boxed{...}` (or `\\fbox{...}`) that closes, nested braces respected.

    `\\boxed 5` (no braces) is accepted too. None when there is none or its braces never close.
    Linear: braces are matched once for the whole text, then the candidates are tried from the end.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    match: dict[int, int] | None = None
    for i in reversed(starts):
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if match is None:
                match = _matching_braces(text)
            j = match.get(i)
            if j is not None:
                return text[i + 1:j].strip()
        else:
            tok = re.match(r"[^\s$]+", text[i:])  # runs once: the first candidate from the end that has one wins
            if tok:
                return tok.group(0).strip()
    return None


def extract_gsm8k(text: str) -> str | None:
    """The rest of the last line holding a `####` marker (after its first marker), thousands
    separators removed ("1,234" -> "1234"). A marker with nothing after it on its line takes the
    next non-blank line. Linear (string searches, no backtracking regex)."""
    p = text.rfind("####")
    while p != -1:
        line_start = text.rfind("\n", 0, p) + 1
        first = text.find("####", line_start)
        rest = text[first + 4:].lstrip()
        if rest:
            end = rest.find("\n")
            ans = (rest if end == -1 else rest[:end]).strip()
            if re.fullmatch(r"-?[\d,]+(\.\d+)?", ans):
                ans = ans.replace(",", "")
            return ans
        p = text.rfind("####", 0, line_start)
    return None


def extract_answer_tag(text: str, pick: AnswerPick = "last") -> str | None:
    """The content of the first or last `<answer>...</answer>` (case-insensitive), stripped.

    Pairs as a lazy regex would (an `<answer>` inside an open one is content) but in one pass over
    the tags, so unclosed tags cost linear time. torchforge's MathReward takes the first; forge's
    default is the last (a model that revises its answer means the later one).
    """
    if pick not in ANSWER_PICKS:
        raise ValueError(f"answer: expected one of {ANSWER_PICKS}, got {pick!r}")
    found: str | None = None
    open_end: int | None = None
    for m in _ANSWER_TOKENS.finditer(text):
        if not m.group(1):
            if open_end is None:
                open_end = m.end()
        elif open_end is not None:
            found = text[open_end:m.start()]
            open_end = None
            if pick == "first":
                break
    return found.strip() if found is not None else None


def extract_last_number(text: str) -> str | None:
    """The last number in free text ("so she has 1,200 apples." -> "1200")."""
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    return last.group().replace(",", "") if last is not None else None


def extract_answer(text: str, answer: AnswerPick = "last") -> str | None:
    """The answer a response gives, by priority: `<answer>` (the `answer`: first or last one),
    `\\boxed{}`, `####`, last number.

    Inside an `<answer>` tag a `\\boxed{}` is unwrapped ("<answer>\\boxed{3}</answer>" -> "3").
    """
    tagged = extract_answer_tag(text, answer)
    if tagged is not None:
        return extract_boxed(tagged) or tagged
    for fn in (extract_boxed, extract_gsm8k, extract_last_number):
        ans = fn(text)
        if ans is not None:
            return ans
    return None


def _raw(text: str) -> str | None:
    return text


TARGET_FORMATS: dict[str, Callable[[str], str | None]] = {
    "raw": _raw,
    "gsm8k": extract_gsm8k,
    "math": extract_boxed,
    "boxed": extract_boxed,
    "answer_tag": extract_answer_tag,
    "auto": extract_answer,
}


def format_target(text: object, fmt: str | None, *, where: str = "target") -> str:
    """Apply a dataset's `target_format` to one raw target value; a clear error when it fails."""
    if fmt is None or fmt == "raw":
        return str(text)
    if fmt not in TARGET_FORMATS:
        raise ValueError(f"{where}: unknown target_format '{fmt}'; expected one of {sorted(TARGET_FORMATS)}")
    out = TARGET_FORMATS[fmt](str(text))
    if out is None:
        snippet = str(text)[-120:]
        raise ValueError(f"{where}: target_format '{fmt}' found no answer in {snippet!r}")
    return out


def normalize_number(text: str) -> str | None:
    """Canonical text of a plain number, None for anything else: "$1,200.50" -> "1200.5",
    " 42 " -> "42", "1e6" -> "1000000", "1e-6" -> "0.000001". Equal values give equal text; an
    integer value has no decimal point (what `MathReward` compares exactly). Exponents beyond
    +-100 stay in scientific form ("1E+101") rather than being written out in full."""
    s = text.strip().strip("$").strip()
    s = s.replace(",", "").replace("\\!", "").replace(" ", "")
    if s.endswith("."):
        s = s[:-1]
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only what Decimal reads
        return None
    if d.is_zero():
        return "0"
    d = d.normalize()
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    if abs(exp) > _MAX_FIXED_EXPONENT or d.adjusted() > _MAX_FIXED_EXPONENT:
        return format(d, "E")
    return format(d, "f")
