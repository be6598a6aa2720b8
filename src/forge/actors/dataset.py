"""`DatasetActor`: hands the RL loop one formatted prompt at a time.

    dataloader = await DatasetActor.as_actor(path="data/gsm8k", split="train",
                                             columns={"prompt": "question", "target": "answer"},
                                             target_format="gsm8k", system_prompt="...",
                                             model="/ckpt/qwen3-1.7b")     # tokenizer for the chat template
    sample = await dataloader.sample.call_one()   # {"request": ..., "target": ..., "prompt": ...}

or `DatasetActor.as_actor(task="arithmetic", task_kwargs={"difficulty": 2})` for a built-in task.
torchforge's arguments (`path`, `revision`, `data_split`, `streaming`, `model`) are accepted.
Each proc of the actor is one data-parallel rank (`self.rank` / `self.world_size`) unless
`dp_rank` / `dp_size` are given. The dataset cycles through epochs (shuffled anew each one);
`sample()` returns None only when `max_epochs` is set and reached. Every row must carry a target
(rewards score against it): a dataset without a target column fails at setup.
"""

from __future__ import annotations

from typing import Any

from forge.controller import ForgeActor, endpoint
from forge.data.datasets import DatasetConfig, PromptDataset
from forge.observability import Reduce, record_metric


class DatasetActor(ForgeActor):
    # a restarted dataset continues from the position the service kept after the last sample,
    # never from the start of its epoch
    restart_policy = "restore"

    def __init__(self, model: str | None = None, tokenizer: Any = None, dp_rank: int | None = None,
                 dp_size: int | None = None, **dataset_config: Any):
        # `model` (torchforge) and `tokenizer` both name where the chat template comes from
        self.config = DatasetConfig.from_dict(dataset_config)
        self._tokenizer_src = tokenizer if tokenizer is not None else model
        self._dp = (self.rank if dp_rank is None else dp_rank, self.world_size if dp_size is None else dp_size)
        self.dataset: PromptDataset | None = None

    async def setup(self) -> None:
        rank, world = self._dp
        self.dataset = PromptDataset(self.config, tokenizer=self._tokenizer_src, rank=rank, world_size=world,
                                     require_target=True)

    def _ds(self) -> PromptDataset:
        if self.dataset is None:  # setup() not run (a bare instance in a unit test)
            rank, world = self._dp
            self.dataset = PromptDataset(self.config, tokenizer=self._tokenizer_src, rank=rank, world_size=world,
                                     require_target=True)
        return self.dataset

    @endpoint(changes_state=True)
    async def sample(self) -> dict[str, Any] | None:
        ds = self._ds()
        try:
            item = next(ds)
        except StopIteration:
            return None
        # where the item sits in the run's data order (rank, epoch, position in the epoch): the same in
        # every run with this seed, whichever rollout task drew it — the app seeds and orders by it
        item = {**item, "sample_id": f"r{ds.rank}-e{ds.epoch}-i{ds.index:08d}"}
        record_metric("dataset/epoch", ds.epoch, Reduce.MAX)
        record_metric("dataset/sample/count_samples_generated", 1, Reduce.SUM)
        record_metric("dataset/sample/avg_sample_len", len(item["request"]), Reduce.MEAN)
        return item

    @endpoint
    async def state_dict(self) -> dict[str, Any]:
        return self._ds().state_dict()

    @endpoint(changes_state=True)
    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ds().load_state_dict(state)

    @endpoint
    async def num_samples(self) -> int | None:
        """Rows in the dataset (all ranks); None for a streaming dataset."""
        return self._ds().num_samples()

    @endpoint
    async def epoch(self) -> int:
        return self._ds().epoch

    @endpoint
    async def pad_token(self) -> int | None:
        """torchforge's endpoint: the tokenizer's pad id (None without a tokenizer)."""
        tok = self._ds().tokenizer
        return None if tok is None else tok.pad_token_id
