"""The RL `Trainer` service: a thin actor over `forge.trainer.engine.TrainEngine`.

    trainer = await Trainer.options(procs=2, with_gpus=True).as_actor(
        model={"path": "/ckpt/Qwen2.5-0.5B"}, loss={"name": "grpo", "beta": 0.0},
        optimizer={"lr": 1e-6}, training={"max_tokens_per_microbatch": 8192, "temperature": 1.0})
    loss = await trainer.train_step.call(inputs, targets)    # same full batch to every rank
    await trainer.push_weights.call(version)

Every endpoint runs on every proc of the replica (`.call()`); with procs > 1 the procs form an
FSDP2 group from the RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT the monarch backend sets.
Heavy work runs in a thread so other services on a shared event loop keep going.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from forge.controller import ForgeActor, endpoint
from forge.observability import Reduce, record_metric
from forge.trainer.config import TrainerConfig

_PUBLISHER_KEYS = {
    "inproc": ("name", "mode"),
    "shm": ("name", "directory", "dtype", "keep"),
    "cuda_ipc": ("name", "directory", "dtype"),
    "broadcast": ("addr", "port", "num_receivers", "backend", "dtype", "bucket_bytes", "timeout_s"),
}


def with_tokenizer_pad_id(training: dict[str, Any] | None, model: Any) -> dict[str, Any]:
    """`training` with `pad_id` taken from the model directory's tokenizer when not given (as
    torchforge does): the id the collated batch was padded with, which the config's model args
    need not know (many configs leave pad_token_id unset)."""
    t = dict(training or {})
    if t.get("pad_id") is not None:
        return t
    path = model if isinstance(model, str) else (model or {}).get("path") or (model or {}).get("hf_assets_path")
    if not path:
        return t
    from forge.models.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(str(path))
    except (OSError, ValueError):  # no tokenizer files: the model args' pad id, as before
        return t
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is not None:
        t["pad_id"] = int(pad)
    return t


class FunctionLoss(nn.Module):
    """A plain loss function `fn(logprobs, ref_logprobs, advantages, padding_mask) -> scalar` as a
    forge loss (each micro-batch's value weighted by its sequences, like torchforge's per-sequence mean)."""

    agg = "seq-mean-token-mean"

    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.needs_ref = "ref_logprobs" in inspect.signature(fn).parameters
        self.needs_old_logprobs = False

    def forward(self, logprobs, ref_logprobs, advantages, padding_mask, **_: Any) -> torch.Tensor:
        kw = {"ref_logprobs": ref_logprobs} if self.needs_ref else {}
        return self.fn(logprobs=logprobs, advantages=advantages, padding_mask=padding_mask, **kw)


def loss_from_callable(loss: Any) -> Any:
    """`Trainer(loss=<function>)`: torchforge passes a function. One that carries a forge loss spec
    (`forge.compat.simple_grpo_loss`) is that loss; one written on logprobs is wrapped; one on
    logits is refused: forge computes logprobs chunk-wise and never materialises [B, T, V] logits."""
    if isinstance(loss, (str, dict, type, nn.Module)) or loss is None or not callable(loss):
        return loss
    spec = getattr(loss, "forge_loss_spec", None)
    if spec is not None:
        return dict(spec)
    params = inspect.signature(loss).parameters
    if "logprobs" in params:
        return FunctionLoss(loss)
    raise TypeError(
        f"Trainer(loss={getattr(loss, '__name__', loss)!r}): forge's trainer computes per-token logprobs "
        "chunk-wise and never materialises logits; write the loss as fn(logprobs, ref_logprobs, advantages, "
        "padding_mask) or use a forge.losses loss (torchforge's simple_grpo_loss: forge.compat.simple_grpo_loss)")


class Trainer(ForgeActor):
    # weights, optimizer moments, LR schedule and step live only in the process: a restart would
    # train on from the base weights. A dead trainer is lost; the run resumes from a checkpoint.
    restart_policy = "fail"

    def __init__(
        self,
        model: dict[str, Any] | str | None = None,
        loss: Any = "grpo",
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        checkpoint: dict[str, Any] | None = None,
        parallelism: dict[str, Any] | None = None,
        compile: Any = None,
        activation_checkpoint: Any = None,
        weight_sync: dict[str, Any] | None = None,
        config: TrainerConfig | None = None,
        **unused: Any,
    ):
        self.weight_sync_cfg = dict(weight_sync or {"transport": "inproc"})
        self.engine: Any = None
        self._publisher: Any = None
        self._publish_bytes = 0
        if config is not None:  # typed and validated by the caller (the apps): passed through as it is
            given = {k: v for k, v in dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, training=training,
                                           checkpoint=checkpoint, parallelism=parallelism, compile=compile,
                                           activation_checkpoint=activation_checkpoint, **unused).items()
                     if v is not None}
            if given or loss != "grpo":
                raise TypeError(f"Trainer(config=...) takes no other config arguments, got {sorted(given) or ['loss']}")
            if not isinstance(config, TrainerConfig):
                raise TypeError(f"Trainer(config=...) must be a forge.trainer.TrainerConfig, got {type(config).__name__}")
            self.cfg = config
            return
        loss = loss_from_callable(loss)
        training = with_tokenizer_pad_id(training, model)
        raw = {"model": model or {"tiny": "qwen2", "seed": 0}, "loss": loss, "optimizer": optimizer or {},
               "lr_scheduler": lr_scheduler or {}, "training": training or {}, "checkpoint": checkpoint or {},
               "parallelism": parallelism or {}, **unused}
        if compile is not None:
            raw["compile"] = compile
        if activation_checkpoint is not None:
            raw["activation_checkpoint"] = activation_checkpoint
        self.cfg = TrainerConfig.from_dict(raw)  # fail on bad config at construction, before any weights load

    async def setup(self) -> None:
        from forge.trainer.engine import TrainEngine

        self.engine = await asyncio.to_thread(TrainEngine, self.cfg, self.device, self.rank, self.world_size)
        if self.cfg.checkpoint.resume and self.cfg.checkpoint.dir:
            await asyncio.to_thread(self.engine.load)

    # ------------------------------------------------------------------ training
    @endpoint
    async def train_step(self, inputs: list[dict], targets: list[dict]) -> float:
        loss = await asyncio.to_thread(self.engine.train_step, inputs, targets)
        await asyncio.to_thread(self.engine.maybe_save)
        return loss

    @endpoint
    async def sft_step(self, batch: dict[str, torch.Tensor]) -> float:
        return await asyncio.to_thread(self.engine.sft_step, batch)

    @endpoint
    async def forward_logprobs(self, inputs: list[dict], targets: list[dict]) -> torch.Tensor:
        """The trainer's logprobs of the batch's response tokens `[B, R]` (CPU), e.g. to measure
        the train/inference mismatch against `generator_logprobs`."""
        out = await asyncio.to_thread(self.engine.forward_logprobs, inputs, targets)
        return out.cpu()

    # ------------------------------------------------------------------ checkpoints
    @endpoint
    async def save(self, step: int | None = None, extra: dict[str, Any] | None = None) -> str:
        return str(await asyncio.to_thread(self.engine.save, step, extra))

    @endpoint
    async def load(self, path: str | None = None) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.engine.load, path)

    @endpoint
    async def export_hf(self, path: str, dtype: str | None = None) -> str | None:
        out = await asyncio.to_thread(self.engine.export_hf, path, dtype)
        return None if out is None else str(out)

    @endpoint
    async def save_adapter(self, path: str) -> str:
        """LoRA: the adapters as an HF peft directory (adapter_model.safetensors + adapter_config.json)."""
        return str(await asyncio.to_thread(self.engine.save_adapter, path))

    # ------------------------------------------------------------------ weight sync
    def _get_publisher(self) -> Any:
        if self._publisher is None:
            from forge.models.hf_io import to_dtype
            from forge.weight_sync import WeightPublisher, manifest

            kw = dict(self.weight_sync_cfg)
            transport = kw.pop("transport", "inproc")
            # one config block serves both sides: keep what this transport's publisher takes
            kw = {k: v for k, v in kw.items() if k in _PUBLISHER_KEYS.get(transport, ())}
            if isinstance(kw.get("dtype"), str):  # e.g. bf16 on the wire when the generator runs bf16
                kw["dtype"] = to_dtype(kw["dtype"])
            # with LoRA only the adapters travel (the generator merges them into its base weights)
            source = self.engine.publish_source()
            self._publisher = WeightPublisher(source, transport, **kw)
            self._publish_bytes = sum(e.nbytes for e in manifest(source, kw.get("dtype")))
        return self._publisher

    @endpoint
    async def push_weights(self, version: int | None = None, *, policy_version: int | None = None) -> int:
        """Publish the current weights as `version` (Generator.update_weights(version) applies them).
        `policy_version=` is torchforge's name for it."""
        if (version is None) == (policy_version is None):
            raise TypeError("push_weights: pass the version once, as `version` or `policy_version=`")
        pub = self._get_publisher()
        t0 = time.perf_counter()
        out = await asyncio.to_thread(pub.publish, int(version if version is not None else policy_version))
        if self.rank == 0:
            record_metric("weight_sync/push_s", time.perf_counter() - t0, Reduce.MEAN)
            record_metric("weight_sync/push_bytes", self._publish_bytes, Reduce.MEAN)
        return out

    @endpoint
    async def get_state_dict(self, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Full (gathered) weights on CPU with HF names — the simple path for
        `Generator.update_weights(version, state_dict=...)`; collective under FSDP."""
        from forge.models.hf_io import to_dtype
        from forge.weight_sync import iter_full_params

        dt = to_dtype(dtype)

        def gather() -> dict[str, torch.Tensor]:
            return {n: t.detach().to("cpu", dtype=dt or t.dtype).clone() for n, t in iter_full_params(self.engine.module)}

        return await asyncio.to_thread(gather)

    async def teardown(self) -> None:
        if self._publisher is not None and hasattr(self._publisher, "close"):
            try:
                self._publisher.close()
            except Exception:
                pass


# torchforge's names (its trainer wraps torchtitan; forge's is its own FSDP2 trainer with the same
# endpoints and config keys): code that imports them gets forge's Trainer
TitanTrainer = Trainer
RLTrainer = Trainer
