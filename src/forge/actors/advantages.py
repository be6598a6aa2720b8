"""`ComputeAdvantages`: rewards of a group -> one advantage per episode (forge.advantages)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forge.advantages import compute_advantages
from forge.controller import ForgeActor, endpoint
from forge.types import Episode


class ComputeAdvantages(ForgeActor):
    def __init__(self, method: str = "grpo", **options: Any):
        # fail at start on a bad method/option
        compute_advantages([0.0, 1.0], method=method, lengths=[1, 1], log_metrics=False, **options)
        self.method, self.options = method, options

    @endpoint
    async def compute(self, group: Sequence[Episode] | Sequence[float], lengths: Sequence[int] | None = None) -> list[float]:
        """Advantages for one group: episodes (their `.reward`) or plain rewards."""
        rewards = [float(e.reward) if isinstance(e, Episode) else float(e) for e in group]  # type: ignore[arg-type]
        if lengths is None and group and isinstance(group[0], Episode):
            lengths = [len(e.completion.token_ids) if e.completion is not None  # type: ignore[union-attr]
                       else e.response_len for e in group]
        kw = dict(self.options)
        if lengths is not None:  # the methods that weigh by length (opo, reinforce_pp) read it; the others ignore it
            kw["lengths"] = list(lengths)
        return compute_advantages(rewards, method=self.method, **kw).tolist()
