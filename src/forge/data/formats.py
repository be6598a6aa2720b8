"""Answer extraction shared by dataset targets and rewards.

GSM8K writes its final answer after `#### `; MATH puts it in `\\boxed{...}` (braces may nest);
RL prompts often ask for `<answer>...</answer>`. These helpers pull the answer text out; they
never judge equivalence (that is `forge.data.rewards.MathReward`'s job).
"""

from __future__ import annotations

import re
from typing import Callable

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
# A number as people write it: optional sign, thousands separators, decimals, a fraction.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """The content of the LAST `\\boxed{...}` (or `\\fbox{...}`), nested braces respected.

    `\\boxed 5` (no braces) is accepted too. None when there is none or its braces never close.
    """
    best: str | None = None
    for m in re.finditer(r"\\(?:boxed|fbox)\b", text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, start = 0, i + 1
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        best = text[start:j]
                        break
        else:
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                best = tok.group(0)
    return best.strip() if best is not None else None


def extract_gsm8k(text: str) -> str | None:
    """The text after the last `####` marker, thousands separators removed ("1,234" -> "1234")."""
    found = _GSM8K.findall(text)
    if not found:
        return None
    ans = found[-1].strip()
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", ans):
        ans = ans.replace(",", "")
    return ans


def extract_answer_tag(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` (case-insensitive), stripped."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def extract_last_number(text: str) -> str | None:
    """The last number in free text ("so she has 1,200 apples." -> "1200")."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "")


def extract_answer(text: str) -> str | None:
    """The answer a response gives, by priority: `<answer>`, `\\boxed{}`, `####`, last number.

    Inside an `<answer>` tag a `\\boxed{}` is unwrapped ("<answer>\\boxed{3}</answer>" -> "3").
    """
    tagged = extract_answer_tag(text)
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
    """Canonical text of a plain number ("$1,200.50" -> "1200.5", " 42 " -> "42"); None otherwise."""
    s = text.strip().strip("$").strip()
    s = s.replace(",", "").replace("\\!", "").replace(" ", "")
    if s.endswith("."):
        s = s[:-1]
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
        return None
    neg = s.startswith("-")
    s = s.lstrip("+-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return ("-" + s) if neg and s != "0" else s
