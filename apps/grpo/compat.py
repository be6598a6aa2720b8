"""The one place where torchforge's configs are translated into forge's (GRPO and SFT).

- `normalize_skill_schema`: the condensed schema of reference/torchforge-skill.txt.
- `apply_torchforge_defaults`: what torchforge's GRPO app means where its config is silent
  (loss, rewards, GSM8K formatting).
- `normalize_torchforge_sft` / `TORCHFORGE_SFT_KEYS`: torchforge's apps/sft layout.

Accept the condensed torchforge config schema (reference/torchforge-skill.txt) as written.

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

from forge.config.compat import APP, TORCHTITAN_TRAINER_KEYS


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


# ---------------------------------------------------------------- torchforge's GRPO app defaults
# What a torchforge GRPO config means where it is silent (its apps/grpo/main.py hard-codes these):
# simple_grpo_loss with beta 0.1 against a reference model, the mean of MathReward and
# ThinkingReward, and GSM8K prompts through the tokenizer's chat template with this system prompt.
TORCHFORGE_LOSS: dict[str, Any] = {"name": "simple_grpo", "beta": 0.1}
TORCHFORGE_REWARDS: list[dict[str, Any]] = [{"name": "math", "weight": 0.5}, {"name": "thinking", "weight": 0.5}]
TORCHFORGE_SYSTEM_PROMPT = (
    "Put all your scratchpad work between <think> and </think> tags.\n"
    "Your final answer should be between <answer> and </answer> tags otherwise it will not be scored."
)
TORCHFORGE_DATASET: dict[str, Any] = {
    "columns": {"prompt": "question", "target": "answer"}, "target_format": "gsm8k",
    "system_prompt": TORCHFORGE_SYSTEM_PROMPT, "chat_template": True,
}
_DATASET_FORMAT_KEYS = {"task", "columns", "prompt_template", "system_prompt", "chat_template", "target_format"}


def apply_torchforge_defaults(data: dict[str, Any], notes: list[str]) -> None:
    """Where a torchforge config is silent, mean what torchforge's app does (and say so once)."""
    loss = data.get("loss")
    if loss is None:
        data["loss"] = dict(TORCHFORGE_LOSS)
        notes.append(
            "loss: simple_grpo with beta 0.1 and a reference model (torchforge's apps/grpo loss) because the config "
            "sets no `loss`; forge's own configs use {name: grpo, clip_low: 0.2, clip_high: 0.28}")
    elif isinstance(loss, dict) and not ({"name", "_target_"} & set(loss)):
        # `loss.beta=0.1` on a config without `loss`: edit the default loss, do not replace it
        data["loss"] = {**TORCHFORGE_LOSS, **loss}
        notes.append(f"loss: {data['loss']} (the config's {loss} on top of torchforge's default loss)")
    if "rewards" not in data and data.get("env") is None:
        data["rewards"] = [dict(r) for r in TORCHFORGE_REWARDS]
        notes.append("rewards: the mean of math and thinking (torchforge's MathReward + ThinkingReward) "
                            "because the config sets no `rewards`")
    ds = data.get("dataset")
    if isinstance(ds, dict) and data.get("env") is None and not (_DATASET_FORMAT_KEYS & set(ds)):
        for k, v in TORCHFORGE_DATASET.items():
            ds[k] = copy.deepcopy(v)
        notes.append(
            "dataset: GSM8K columns (question -> answer after '####') through the tokenizer's chat template with "
            "torchforge's system prompt, as torchforge's DatasetActor formats them, because the dataset block "
            "names no columns/system_prompt/target_format")


# ---------------------------------------------------------------- torchforge's SFT layout
# apps/sft/{llama3_8b,qwen3_8b}.yaml: model_name, model (torchtitan), processes, optimizer,
# lr_scheduler, training, parallelism, checkpoint, activation_checkpoint, comm, metric_logging.
# Where each key goes in forge's SFT config (None: accepted, not used, reported once). torchtitan's
# `training.*` / `checkpoint.*` / `model.*` keys come from forge.config.compat's table (the one the GRPO
# app and the trainer read); the rest is the SFT layout's own.
SFT_APP_KEYS: dict[str, str] = {"steps": "steps", "local_batch_size": "batch_size", "seq_len": "max_seq_len"}
_SFT_LAYOUT_KEYS: dict[str, str | None] = {
    "optimizer": "trainer.optimizer",
    "lr_scheduler": "trainer.lr_scheduler",
    "training.max_norm": "trainer.training.max_norm",
    "training.compile": "trainer.training.compile",
    "training.dtype": "trainer.training.dtype",
    "checkpoint.folder": None,  # the app checkpoints under output_dir/checkpoints
    "processes.procs": "procs",
    "processes.with_gpus": "with_gpus",
    "comm": None,
    "parallelism": "trainer.parallelism",
    "model.hf_assets_path": None,  # the model is `model_name`
}


def _sft_keys() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, rule in TORCHTITAN_TRAINER_KEYS.items():
        if not key.startswith(("training.", "checkpoint.", "model.")):
            continue
        if rule.dest is None:
            out[key] = None
        elif rule.dest.startswith(APP):
            out[key] = SFT_APP_KEYS[rule.dest[len(APP):]]
        else:
            out[key] = f"trainer.{rule.dest}"
    return {**out, **_SFT_LAYOUT_KEYS}


TORCHFORGE_SFT_KEYS: dict[str, str | None] = _sft_keys()
# torchforge's SFT app reads Alpaca (instruction, input, output) through the chat template
TORCHFORGE_SFT_DATASET: dict[str, Any] = {
    "path": "yahma/alpaca-cleaned", "split": "train", "chat_template": True,
    "columns": {"prompt": "instruction", "completion": "output"},
    "prompt_template": "{instruction}\n\n{input}",
}


def is_torchforge_sft(cfg: dict[str, Any]) -> bool:
    return "model_name" in cfg or "processes" in cfg or isinstance(cfg.get("model"), dict)


def normalize_torchforge_sft(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str], list[str]]:
    """torchforge's SFT layout -> forge's SFT config. Returns (config, moved, unused, notes)."""
    if not is_torchforge_sft(raw):
        return raw, [], [], []
    src = copy.deepcopy(raw)
    out: dict[str, Any] = {}
    moved: list[str] = []
    unused: list[str] = []
    notes: list[str] = []
    model = src.pop("model", None)
    name = src.pop("model_name", None)
    if isinstance(model, dict):
        path = model.pop("hf_assets_path", None) or model.pop("path", None)
        for k in list(model):
            _route(f"model.{k}", model[k], out, moved, unused)
        out["model"] = path if path is not None else name
    else:
        out["model"] = model if model is not None else name
    if out["model"] is None:
        raise ValueError("torchforge SFT config: set `model_name` (or model.hf_assets_path)")
    processes = src.pop("processes", None) or {}
    for k, v in processes.items():
        _route(f"processes.{k}", v, out, moved, unused)
    ac = src.pop("activation_checkpoint", None)
    if ac is not None:
        on = ac.get("mode", "none") not in ("none", None, False) if isinstance(ac, dict) else bool(ac)
        _set(out, "trainer.training.activation_checkpoint", on)
        moved.append("activation_checkpoint -> trainer.training.activation_checkpoint")
    for block in ("optimizer", "lr_scheduler"):
        if block in src:
            _route(block, src.pop(block), out, moved, unused)
    for block in ("training", "checkpoint", "comm", "parallelism"):
        sub = src.pop(block, None)
        if isinstance(sub, dict) and block in ("training", "checkpoint"):
            for k, v in sub.items():
                _route(f"{block}.{k}", v, out, moved, unused)
        elif sub is not None:
            _route(block, sub, out, moved, unused)
    ds = src.get("dataset")
    if ds is None or (isinstance(ds, dict) and not ({"task", "columns", "prompt_template"} & set(ds))):
        # torchforge's layout has no dataset block (its app reads Alpaca); `dataset.path=...` edits that
        src["dataset"] = {**copy.deepcopy(TORCHFORGE_SFT_DATASET), **(ds or {})}
        notes.append("dataset: Alpaca (instruction + input -> output, chat template), torchforge's SFT data, because "
                     "the config names no dataset columns; point dataset.path at a local copy")
    out.update(src)  # forge's own keys (metric_logging, output_dir, dataset, eval, ...) as they are
    return out, moved, unused, notes


def _route(key: str, value: Any, out: dict[str, Any], moved: list[str], unused: list[str]) -> None:
    if key not in TORCHFORGE_SFT_KEYS:
        raise ValueError(f"unknown key '{key}' in torchforge's SFT layout (known: "
                         f"{', '.join(sorted(TORCHFORGE_SFT_KEYS))})")
    dest = TORCHFORGE_SFT_KEYS[key]
    if dest is None:
        unused.append(key)
        return
    _set(out, dest, value)
    moved.append(f"{key} -> {dest}")


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]].update(value)
    else:
        node[parts[-1]] = value
