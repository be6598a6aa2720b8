"""The one table of foreign key spellings: vLLM's `engine_args` / `sampling_params` and
torchtitan's trainer blocks, as torchforge configs carry them, and what each means in forge.

The GRPO app's config check and its Generator arguments (apps/grpo/config.py) and the SFT app's
torchforge layout (apps/grpo/compat.py) translate through this module;
`forge.actors.Generator(engine_args=..., sampling_params=...)` and the Trainer's torchtitan names
(forge.trainer.config) must mean the same: tests/test_compat_keys.py holds all of them to it.
A key maps to forge's key (`Rename.dest`, with an optional conversion of its value) or to
None: accepted, not used, reported once as unused (`Rename.why` says why). A key in none of
these tables is an error where the config is checked (the closest valid key named).

`tensor_parallel_size` is the engine's tensor-parallel degree (forge.engine.tp; the GRPO app
checks it equals `services.policy.procs`); `data_parallel_size` is what `num_replicas` says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rename:
    """What one foreign key means in forge: `dest` (None: accepted and not used) and how its
    value converts (`convert`, None: as it is)."""

    dest: str | None
    convert: Callable[[Any], Any] | None = None
    why: str = ""
    # a key accepted only at this value (a degree of a parallelism forge does not have): another value is an
    # error, never a silently different experiment; None: every value
    only: Any = None

    def value(self, v: Any) -> Any:
        return self.convert(v) if self.convert is not None else v

    def check(self, key: str, v: Any) -> None:
        """Raise if `v` asks for something forge does not do (see `only`)."""
        if self.only is not None and v != self.only:
            raise ValueError(f"{key}={v!r}: only {self.only!r} is supported ({self.why})")


def _not(v: Any) -> bool:
    return not v


def _vllm_top_k(v: Any) -> int:
    return max(0, int(v))  # vLLM: -1 = off; forge: 0 = off


def _vllm_logprobs(v: Any) -> bool:
    return v is not None and v is not False  # vLLM: how many top logprobs; forge: the sampled token's, on/off


# vLLM `engine_args` (torchforge: policy.engine_args) -> forge.engine.EngineConfig
ENGINE_ARGS_MODEL = "model"  # the checkpoint to load: the Generator's `model` (the GRPO app's top-level `model`)
VLLM_ENGINE_ARGS: dict[str, Rename] = {
    ENGINE_ARGS_MODEL: Rename(None, why="the model to load is the Generator's `model` (the app's top-level `model`)"),
    "gpu_memory_utilization": Rename("gpu_memory_fraction"),
    "max_num_seqs": Rename("max_num_seqs"),
    "max_model_len": Rename("max_model_len"),
    "max_num_batched_tokens": Rename("max_num_batched_tokens"),
    "block_size": Rename("block_size"),
    "dtype": Rename("dtype"),
    "seed": Rename("seed"),
    "enforce_eager": Rename("enable_cuda_graphs", _not, "vLLM's enforce_eager turns CUDA graphs off"),
    # the engine's tensor-parallel degree; a replica has one proc per rank (services.policy.procs)
    "tensor_parallel_size": Rename("tensor_parallel_size"),
    "pipeline_parallel_size": Rename(None, why="forge's engine has no pipeline parallelism", only=1),
    "data_parallel_size": Rename(None, why="generator replicas are services.policy.num_replicas", only=1),
    "trust_remote_code": Rename(None, why="forge builds its own model classes (no remote code runs)"),
    "disable_custom_all_reduce": Rename(None, why="a vLLM kernel choice"),
    "enable_prefix_caching": Rename(None, why="forge's block manager has no prefix cache"),
}

# vLLM `SamplingParams` (torchforge: policy.sampling_params) whose meaning differs from forge's
# forge.engine.SamplingParams field of the same name; any other field name means the same
VLLM_SAMPLING_PARAMS: dict[str, Rename] = {
    "top_k": Rename("top_k", _vllm_top_k, "vLLM's -1 (off) is forge's 0"),
    "logprobs": Rename("logprobs", _vllm_logprobs, "vLLM's count of top logprobs: forge returns the sampled "
                                                  "token's logprob when it is set"),
}

# torchtitan keys of torchforge's trainer blocks (`trainer.<block>.<key>`), as `block.key`:
# forge's `block.key` in forge.trainer.TrainerConfig, an app-level key (`APP + name`: each app
# places it, see `APP_KEYS_*` in apps/grpo/compat.py), or None
APP = "app:"
TORCHTITAN_TRAINER_KEYS: dict[str, Rename] = {
    "model.hf_assets_path": Rename("model.path"),
    "model.name": Rename(None, why="the architecture comes from the checkpoint's config.json"),
    "model.flavor": Rename(None, why="the architecture comes from the checkpoint's config.json"),
    "model.tokenizer_path": Rename(None, why="the tokenizer is the model directory's"),
    "model.converters": Rename(None, why="torchtitan model converters (float8, ...) are not built"),
    "lr_scheduler.decay_type": Rename("lr_scheduler.decay"),
    "training.mixed_precision_param": Rename("training.dtype"),
    "training.max_grad_norm": Rename("training.max_norm"),
    "training.steps": Rename(APP + "steps"),
    "training.local_batch_size": Rename(APP + "local_batch_size"),
    "training.seq_len": Rename(APP + "seq_len"),
    "training.gradient_accumulation_steps": Rename(
        None, why="the trainer packs a step's episodes into micro-batches by max_tokens_per_microbatch"),
    "training.gc_freq": Rename(None, why="a torchtitan garbage-collection knob"),
    "training.mixed_precision_reduce": Rename(None, why="a torchtitan FSDP knob"),
    "training.dataset": Rename(None, why="torchtitan's pretraining dataset name; the app's dataset block decides"),
    "checkpoint.folder": Rename("checkpoint.dir"),
    "checkpoint.keep_latest_k": Rename("checkpoint.keep_last_n"),
    "checkpoint.interval": Rename("checkpoint.interval"),
    "checkpoint.enable": Rename(None, why="the apps checkpoint under output_dir"),
    "checkpoint.initial_load_path": Rename(None, why="the starting weights are the top-level `model`"),
    "checkpoint.initial_load_in_hf": Rename(None, why="forge loads HF safetensors"),
    "checkpoint.initial_load_model_only": Rename(None, why="the starting weights are the top-level `model`"),
    "checkpoint.last_save_in_hf": Rename(None, why="the apps export HF safetensors at the end"),
    "checkpoint.async_mode": Rename(None, why="a torchtitan checkpoint knob"),
    "checkpoint.load_step": Rename(None, why="resume takes the newest complete checkpoint"),
    "checkpoint.export_dtype": Rename(None, why="a torchtitan export knob"),
}


def translate_engine_args(engine_args: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """vLLM `engine_args` -> (EngineConfig keys, the keys accepted and not used). `model` is in
    neither (the caller decides what it loads); a key not in `VLLM_ENGINE_ARGS` is unused too:
    callers that hold forge's keys in the same mapping take those out first."""
    out: dict[str, Any] = {}
    unused: list[str] = []
    for k, v in engine_args.items():
        rule = VLLM_ENGINE_ARGS.get(k)
        if k == ENGINE_ARGS_MODEL:
            continue
        if rule is not None:
            rule.check(f"engine_args.{k}", v)
        if rule is None or rule.dest is None:
            unused.append(k)
        else:
            out[rule.dest] = rule.value(v)
    return out, unused


def translate_sampling_params(sampling_params: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM `sampling_params` -> forge's SamplingParams keys (unknown names pass through, for the
    caller's check to name)."""
    return {k: VLLM_SAMPLING_PARAMS[k].value(v) if k in VLLM_SAMPLING_PARAMS else v
            for k, v in sampling_params.items()}
