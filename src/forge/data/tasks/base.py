"""`Task`: a verifiable problem generator with disjoint, seeded train/test splits.

Which split a problem belongs to is a hash of the problem itself (not of the seed or the
index), so train and test never share a problem, whatever the seed or difficulty. Sample
`(split, index)` is a pure function of `(seed, split, index)`: draw problems from a generator
seeded by those until one falls in the split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from forge.data.formats import extract_answer_tag

if TYPE_CHECKING:
    import datasets

_SPLITS = {"train": "train", "test": "test", "validation": "test", "valid": "test", "val": "test",
           "eval": "test"}


def response_answer(response: str) -> str:
    """What a task compares: the `<answer>` content if tagged, else the first line, stripped."""
    tagged = extract_answer_tag(response)
    if tagged is not None:
        return tagged
    return response.strip().split("\n", 1)[0].strip()


@dataclass
class Task:
    seed: int = 0
    test_fraction: float = 0.1
    answer_format: str = "plain"  # "plain": the answer then EOS; "tag": <answer>...</answer>

    name: ClassVar[str] = "task"
    _MAX_DRAWS: ClassVar[int] = 10_000

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"{self.name}: test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.answer_format not in ("plain", "tag"):
            raise ValueError(f"{self.name}: answer_format must be 'plain' or 'tag', got {self.answer_format!r}")

    # ---- what a concrete task defines ----------------------------------------------------
    def draw(self, rng: random.Random) -> dict[str, Any]:
        """One random problem: at least `key` (identity), `prompt`, `target`, `solution`."""
        raise NotImplementedError

    def verify(self, response: str, target: str) -> float:
        """1.0 when the response's answer is exactly right, else 0.0."""
        raise NotImplementedError

    # ---- shared machinery ----------------------------------------------------------------
    def split_of(self, key: str) -> str:
        h = int.from_bytes(hashlib.sha256(f"{self.name}|{key}".encode()).digest()[:8], "big")
        return "test" if h / 2**64 < self.test_fraction else "train"

    @staticmethod
    def canonical_split(split: str) -> str:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}")
        return _SPLITS[split]

    def sample(self, split: str, index: int) -> dict[str, Any]:
        split = self.canonical_split(split)
        if index < 0:
            raise ValueError(f"{self.name}: sample index must be >= 0, got {index}")
        rng = random.Random(f"{self.name}|{self.seed}|{split}|{index}")
        for _ in range(self._MAX_DRAWS):
            p = self.draw(rng)
            if self.split_of(p["key"]) == split:
                p = {k: v for k, v in p.items() if k != "key"}
                p["completion"] = self.sft_completion(p)
                p["split"], p["index"] = split, index
                return p
        raise RuntimeError(f"{self.name}: no {split} problem found in {self._MAX_DRAWS} draws; the problem "
                           f"space is too small for test_fraction={self.test_fraction} (raise the difficulty)")

    def sft_completion(self, sample: dict[str, Any]) -> str:
        """The gold completion text for SFT warm-up (the trainer appends EOS)."""
        sol = str(sample["solution"])
        return f"<answer>{sol}</answer>" if self.answer_format == "tag" else sol

    def as_dataset(self, split: str, n: int) -> datasets.Dataset:
        """`n` samples of a split as an HF dataset (columns prompt, target, completion, ...)."""
        if n <= 0:
            raise ValueError(f"{self.name}: as_dataset needs n >= 1, got {n}")
        # HF `datasets` costs ~1 s to import: only this method needs it, and tasks are imported
        # wherever a reward or env names one (reward worker processes included)
        import datasets

        return datasets.Dataset.from_list([self.sample(split, i) for i in range(n)])

    def __call__(self, prompt: str, response: str, target: str) -> float:
        """A task is a reward function too."""
        return self.verify(response, target)
