"""Prompt datasets for RL and SFT: local files or a built-in task -> formatted items.

    ds = PromptDataset(DatasetConfig(path="gsm8k/", split="train",
                                     columns={"prompt": "question", "target": "answer"},
                                     target_format="gsm8k", system_prompt="Think, then answer."),
                       tokenizer=tok, rank=dp_rank, world_size=dp_size)
    item = ds.next()     # {"request": <chat-formatted prompt>, "target": "72", "prompt": ..., ...}

Order: every epoch is a fresh seeded permutation (`seed`, `epoch`), identical on all ranks;
rank r takes positions r, r+W, r+2W, ... so ranks are disjoint. Map-style datasets drop the
last `n % W` items of each epoch so that every rank sees the same count (ranks stay in step).
`state_dict()` is `{epoch, index}` (index = items this rank consumed in the epoch); a new
dataset given it yields exactly the items the old one would have yielded next.
Streaming datasets shuffle with a seeded buffer and resume by re-reading the epoch's stream
up to `index` (exact, at the cost of reading those items again).
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
import numpy as np

from forge.data.formats import format_target
from forge.data.sources import DatasetError, load_local
from forge.data.tasks import get_task

# Fallback column names when the config gives no mapping for `prompt` / `target`.
_PROMPT_COLUMNS = ("prompt", "question", "problem", "query", "input", "instruction")
_TARGET_COLUMNS = ("target", "answer", "solution", "output", "response", "label")


@dataclass
class DatasetConfig:
    path: str | list[str] | None = None  # file, directory, glob or list (local only)
    task: str | None = None  # a built-in task instead of files (forge.data.tasks)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None  # task split size (default: 10000 train, 500 otherwise)
    split: str = "train"
    name: str | None = None  # hub-style config subfolder ("main" for gsm8k); torchforge's `revision`
    format: str | None = None  # json | csv | parquet | arrow; default from the extension
    streaming: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # forge field -> dataset column
    prompt_template: str | None = None  # e.g. "Question: {prompt}\nAnswer:"; any column name works
    system_prompt: str | None = None
    chat_template: bool | None = None  # None: use the tokenizer's template iff system_prompt/messages
    target_format: str | None = None  # raw | gsm8k | math | answer_tag | auto (forge.data.formats)
    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = 1000  # streaming only
    max_samples: int | None = None  # keep only the first N rows (before shuffling)
    max_epochs: int | None = None  # None: cycle forever (the RL loop); else stop after that many

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | DatasetConfig) -> DatasetConfig:
        """From a config mapping; torchforge's `data_split` / `revision` spellings are accepted."""
        if isinstance(d, DatasetConfig):
            return d
        d = dict(d)
        if "data_split" in d:
            d.setdefault("split", d.pop("data_split"))
        if "revision" in d:
            d.setdefault("name", d.pop("revision"))
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise TypeError(f"dataset config: unknown key(s) {unknown}; valid: {sorted(valid)}")
        return cls(**d)


class PromptDataset:
    def __init__(self, config: DatasetConfig | Mapping[str, Any], *, tokenizer: Any = None,
                 rank: int = 0, world_size: int = 1, require_target: bool = False):
        """`require_target`: every row must carry a target (the RL loop scores answers against it;
        without one every reward is constant, every group filtered, and the run would wait forever)."""
        self.config = cfg = DatasetConfig.from_dict(config)
        if not 0 <= rank < world_size:
            raise ValueError(f"dataset: rank {rank} is not in [0, world_size={world_size})")
        if (cfg.path is None) == (cfg.task is None):
            raise DatasetError("dataset config: give exactly one of `path` (local files) or `task` (built-in)")
        self.rank, self.world_size = rank, world_size
        self._tokenizer = tokenizer
        self.where = f"dataset {cfg.path!r}" if cfg.path is not None else f"task {cfg.task!r}"
        self.epoch, self.index = 0, 0
        self._iter: Iterator[dict[str, Any]] | None = None
        self._task = None
        self.require_target = require_target
        self._ds = self._load()
        self._columns = self._resolve_columns()
        if cfg.prompt_template is not None:
            self._check_template(cfg.prompt_template)

    # ---- loading -------------------------------------------------------------------------
    def _load(self) -> datasets.Dataset | datasets.IterableDataset:
        cfg = self.config
        if cfg.task is not None:
            self._task = get_task(cfg.task, **cfg.task_kwargs)
            n = cfg.num_samples or (10_000 if cfg.split == "train" else 500)
            ds: Any = self._task.as_dataset(cfg.split, n)
        else:
            ds = load_local(cfg.path, split=cfg.split, name=cfg.name, streaming=cfg.streaming, fmt=cfg.format)
        if cfg.max_samples is not None:
            ds = ds.take(cfg.max_samples) if isinstance(ds, datasets.IterableDataset) else \
                ds.select(range(min(cfg.max_samples, len(ds))))
        if isinstance(ds, datasets.Dataset):
            if len(ds) == 0:
                raise DatasetError(f"{self.where} (split {cfg.split!r}) is empty: no rows to train on")
            if len(ds) < self.world_size:
                raise DatasetError(f"{self.where} has {len(ds)} rows, fewer than the {self.world_size} "
                                   f"data-parallel ranks: every rank needs at least one")
        return ds

    def _available_columns(self) -> list[str]:
        names = self._ds.column_names
        if names is None:  # a streaming json dataset only knows its columns after a first row
            first = next(iter(self._ds), None)
            if first is None:
                raise DatasetError(f"{self.where} (split {self.config.split!r}) is empty: no rows to train on")
            names = list(first)
        return list(names)

    def _resolve_columns(self) -> dict[str, str]:
        cols = self._available_columns()
        mapping = dict(self.config.columns)
        for fld, fallbacks in (("prompt", _PROMPT_COLUMNS), ("target", _TARGET_COLUMNS)):
            if fld not in mapping and "messages" not in mapping:
                found = next((c for c in fallbacks if c in cols), None)
                if found is None and fld == "prompt":
                    raise DatasetError(f"{self.where}: no prompt column; columns are {cols}. Map one with "
                                       f"dataset.columns: {{prompt: <column>}}")
                if found is not None:
                    mapping[fld] = found
        if self.require_target and "target" not in mapping:
            raise DatasetError(f"{self.where}: no target (answer) column: looked for {list(_TARGET_COLUMNS)}, "
                               f"columns are {cols}. Map one with dataset.columns: {{target: <column>}}")
        for fld, col in mapping.items():
            if col not in cols:
                raise DatasetError(f"{self.where}: column {col!r} (mapped to {fld!r}) not found; "
                                   f"columns are {cols}")
        return mapping

    def _check_template(self, template: str) -> None:
        known = set(self._columns) | set(self._available_columns())
        for _, fname, _, _ in string.Formatter().parse(template):
            if fname and fname.split(".")[0].split("[")[0] not in known:
                raise DatasetError(f"{self.where}: prompt_template uses {{{fname}}} but the fields are "
                                   f"{sorted(known)}")

    # ---- formatting ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if isinstance(self._tokenizer, str):
            from forge.models.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def _use_chat(self) -> bool:
        cfg = self.config
        if cfg.chat_template is not None:
            return cfg.chat_template
        return cfg.system_prompt is not None or "messages" in self._columns

    def format(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """One raw row -> `{"request", "target", "prompt", <other mapped fields>}`."""
        cfg = self.config
        mapped = {fld: row[col] for fld, col in self._columns.items()}
        out: dict[str, Any] = {k: v for k, v in mapped.items() if k not in ("prompt", "target")}
        if self._task is not None:  # keep the task's own fields (completion, numbers, ...)
            out.update({k: v for k, v in row.items() if k not in out})
        if "messages" in mapped:
            messages = [dict(m) for m in mapped["messages"]]
            prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        else:
            prompt = str(mapped["prompt"])
            text = cfg.prompt_template.format(**{**row, **mapped}) if cfg.prompt_template else prompt
            messages = [{"role": "user", "content": text}]
        if cfg.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages
        if self._use_chat():
            tok = self.tokenizer
            if tok is None:
                raise DatasetError(f"{self.where}: a chat template (system_prompt / messages / chat_template) "
                                   f"needs a tokenizer; give DatasetActor `model:`/`tokenizer:`")
            request = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            request = messages[-1]["content"]
        out["request"] = request
        out["prompt"] = prompt
        if "target" in mapped and mapped["target"] is not None:
            out["target"] = format_target(mapped["target"], cfg.target_format, where=f"{self.where} target")
        elif self.require_target:
            # str(None) would make "None" the answer every reward scores against
            raise DatasetError(f"{self.where}: a row has no value in its target column "
                               f"{self._columns.get('target', 'target')!r} (prompt: {prompt[:80]!r})")
        else:
            out["target"] = None
        return out

    # ---- order, sharding, position -------------------------------------------------------
    @property
    def streaming(self) -> bool:
        return isinstance(self._ds, datasets.IterableDataset)

    def num_samples(self) -> int | None:
        """Rows in the whole dataset (all ranks); None when streaming (unknown until read)."""
        return None if self.streaming else len(self._ds)

    def __len__(self) -> int:
        """Items THIS rank gets per epoch."""
        if self.streaming:
            raise TypeError(f"{self.where} is streaming: its length is unknown (use num_samples())")
        return len(self._ds) // self.world_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self._ds)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(n) if self.config.shuffle \
            else np.arange(n)
        per_rank = n // self.world_size
        return order[self.rank::self.world_size][:per_rank]

    def _epoch_rows(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        if not self.streaming:
            for i in self._epoch_order(epoch)[start:]:
                yield self._ds[int(i)]
            return
        ds = self._ds
        if self.config.shuffle:
            ds = ds.shuffle(seed=self.config.seed, buffer_size=self.config.shuffle_buffer)
            ds.set_epoch(epoch)
        kept = 0
        for i, row in enumerate(ds):
            if i % self.world_size != self.rank:
                continue
            kept += 1
            if kept > start:
                yield row
        if kept == 0:
            raise DatasetError(f"{self.where} (split {self.config.split!r}) is empty for rank {self.rank} "
                               f"of {self.world_size}: no rows to train on")

    def _items(self) -> Iterator[dict[str, Any]]:
        max_epochs = self.config.max_epochs
        while max_epochs is None or self.epoch < max_epochs:
            for row in self._epoch_rows(self.epoch, self.index):
                self.index += 1
                yield self.format(row)
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = self._items()
        return next(self._iter)

    def next(self) -> dict[str, Any]:
        return self.__next__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.config.seed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "world_size"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"{self.where}: cannot resume a position saved with {key}={state[key]} "
                                 f"into a dataset with {key}={self.state_dict()[key]} (the order would differ)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iter = None  # the next item is rebuilt from (epoch, index)
