"""Accept the condensed torchforge config schema (reference/torchforge-skill.txt) as written.

That schema puts the knobs at top level:

    model: ...
    dataset: {path, split, streaming}
    training: {batch_size, learning_rate, seq_len, dtype, gradient_accumulation_steps,
               sync_interval, entropy_coef}
    grpo: {n_samples, clip_low, clip_high, beta, temperature}
    services: {generator, trainer, ref_model}: {procs, num_replicas, with_gpus}
    parallelism: {...}
    ref_model: {with_gpus: false}

`normalize_skill_schema` rewrites such a mapping into forge's app layout (the layout of
torchforge's own apps/grpo/qwen3_1_7b.yaml, which forge uses natively) before validation, so
the same validation and error messages apply. Each moved key is recorded so the user sees
where it went.
"""

from __future__ import annotations

import copy
from typing import Any


def _setdefault_path(d: dict, path: str, value: Any, moved: list[str], src: str) -> None:
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot place '{src}' at '{path}': '{p}' is not a mapping")
    node[parts[-1]] = value
    moved.append(f"{src} -> {path}")


def is_skill_schema(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg.get("grpo"), dict) or isinstance(cfg.get("training"), dict)


def normalize_skill_schema(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    if not is_skill_schema(raw):
        return raw, []
    cfg = copy.deepcopy(raw)
    moved: list[str] = []
    training = cfg.pop("training", None) or {}
    grpo = cfg.pop("grpo", None) or {}

    n_samples = grpo.pop("n_samples", None)
    if n_samples is not None:
        _setdefault_path(cfg, "group_size", n_samples, moved, "grpo.n_samples")
    for k in ("clip_low", "clip_high", "beta"):
        if k in grpo:
            _setdefault_path(cfg, f"loss.{k}", grpo.pop(k), moved, f"grpo.{k}")
    if "temperature" in grpo:
        _setdefault_path(cfg, "policy.sampling_params.temperature", grpo.pop("temperature"), moved, "grpo.temperature")
    if "loss" in grpo:
        _setdefault_path(cfg, "loss.name", grpo.pop("loss"), moved, "grpo.loss")
    for k, v in grpo.items():  # anything else in grpo: keep it where validation will name it
        _setdefault_path(cfg, f"grpo_unknown.{k}", v, moved, f"grpo.{k}")

    mapping = {
        "batch_size": "prompts_per_step",
        "learning_rate": "trainer.optimizer.lr",
        "seq_len": "trainer.training.seq_len",
        "dtype": "trainer.training.dtype",
        "gradient_accumulation_steps": "trainer.training.gradient_accumulation_steps",
        "sync_interval": "sync_interval",
        "entropy_coef": "loss.entropy_coef",
        "steps": "trainer.training.steps",
        "max_norm": "trainer.training.max_norm",
    }
    for k, v in training.items():
        if k not in mapping:
            _setdefault_path(cfg, f"training_unknown.{k}", v, moved, f"training.{k}")
            continue
        _setdefault_path(cfg, mapping[k], v, moved, f"training.{k}")

    if isinstance(cfg.get("loss"), dict) and not any(k in cfg["loss"] for k in ("name", "_target_")):
        cfg["loss"]["name"] = "grpo"  # the skill schema's grpo block means forge's GRPOLoss

    if "parallelism" in cfg:
        _setdefault_path(cfg, "trainer.parallelism", cfg.pop("parallelism"), moved, "parallelism")

    ds = cfg.get("dataset")
    if isinstance(ds, dict) and "split" in ds:
        ds["data_split"] = ds.pop("split")
        moved.append("dataset.split -> dataset.data_split")

    services = cfg.get("services") or {}
    if "generator" in services:
        services["policy"] = services.pop("generator")
        moved.append("services.generator -> services.policy")
    if "trainer" in services:
        actors = cfg.setdefault("actors", {})
        actors["trainer"] = services.pop("trainer")
        moved.append("services.trainer -> actors.trainer")

    ref = cfg.get("ref_model")
    if isinstance(ref, dict):
        for k in ("procs", "num_replicas", "with_gpus"):
            if k in ref:
                _setdefault_path(cfg, f"services.ref_model.{k}", ref.pop(k), moved, f"ref_model.{k}")
    return cfg, moved
