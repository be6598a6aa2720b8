"""Where the SFT app's training runs: in this process (`procs: 1`), or as one forge `Trainer`
actor of `procs` processes (FSDP2 across them) on the monarch provisioner — torchforge's
`processes: {procs: 8}`. The app's loop drives either through the same five calls."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch

from forge.models.decoder import CausalLM
from forge.models.hf_io import load_state_dict_into
from forge.trainer.config import TrainerConfig
from forge.trainer.engine import TrainEngine, build_model


class LocalSFTTrainer:
    """A `TrainEngine` in this process."""

    def __init__(self, trainer_cfg: TrainerConfig, device: torch.device):
        self.engine = TrainEngine(trainer_cfg, device)

    async def sft_step(self, batch: dict[str, torch.Tensor]) -> float:
        return self.engine.sft_step(batch)

    async def save(self, step: int, extra: dict[str, Any]) -> None:
        self.engine.save(step, extra=extra)

    async def load(self) -> dict[str, Any] | None:
        return self.engine.load()

    async def eval_model(self) -> CausalLM:
        return self.engine.model

    async def export_hf(self, path: Path) -> Path:
        out = self.engine.export_hf(path)
        assert out is not None  # one process: this one writes
        return out

    async def save_adapter(self, path: Path) -> Path:
        return self.engine.save_adapter(path)

    async def close(self) -> None:
        pass


class ActorSFTTrainer:
    """`procs` trainer processes as one `Trainer` actor; every call goes to all of them (each
    rank trains on its rows of the batch, checkpoints are collective DCP saves). Evaluation runs
    here on a copy of the gathered weights."""

    def __init__(self, actor: Any, device: torch.device, scratch: Path):
        self.actor, self.device, self.scratch = actor, device, scratch
        self._eval: CausalLM | None = None

    @classmethod
    async def start(cls, trainer_cfg: TrainerConfig, procs: int, with_gpus: bool, device: torch.device,
                    scratch: Path) -> ActorSFTTrainer:
        from forge.actors import Trainer
        from forge.controller import init_provisioner

        try:
            init_provisioner("monarch")
        except ImportError as e:
            raise RuntimeError(f"procs: {procs} runs the trainer's processes with Monarch: "
                               f"pip install 'forge[monarch]' ({e})") from None
        actor = await Trainer.options(procs=procs, with_gpus=with_gpus).as_actor(config=trainer_cfg)
        return cls(actor, device, scratch)

    async def sft_step(self, batch: dict[str, torch.Tensor]) -> float:
        return float((await self.actor.sft_step.call(batch))[0])

    async def save(self, step: int, extra: dict[str, Any]) -> None:
        await self.actor.save.call(step, extra)

    async def load(self) -> dict[str, Any] | None:
        return (await self.actor.load.call())[0]

    async def eval_model(self) -> CausalLM:
        # through an HF export (rank 0 writes one copy) rather than `get_state_dict`, whose
        # `.call()` would bring a full copy of the weights back from every rank
        path = await self.export_hf(self.scratch)
        if self._eval is None:
            self._eval = await asyncio.to_thread(build_model, {"path": str(path)}, self.device)
        else:
            await asyncio.to_thread(load_state_dict_into, self._eval, path)
        return self._eval

    async def export_hf(self, path: Path) -> Path:
        out = (await self.actor.export_hf.call(str(path)))[0]  # collective; rank 0 writes
        return Path(out)

    async def save_adapter(self, path: Path) -> Path:
        return Path((await self.actor.save_adapter.call(str(path)))[0])  # collective

    async def close(self) -> None:
        from forge.controller import shutdown

        await shutdown()
