"""forge.config.compat is the one table of vLLM / torchtitan key spellings: the GRPO app's config
check, its Generator arguments, the Generator's own `engine_args=` / `sampling_params=` and the
trainer's torchtitan names all mean what the table says (a key the app reports as unused is one
the Generator does not map, and every key the Generator maps the app honours)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from apps.grpo.compat import TORCHFORGE_SFT_KEYS
from apps.grpo.config import APP_KEYS, load_grpo_config
from forge.actors.generator import _engine_config, _sampling_params
from forge.config import ConfigError
from forge.config.compat import (
    APP,
    ENGINE_ARGS_MODEL,
    TORCHTITAN_TRAINER_KEYS,
    VLLM_ENGINE_ARGS,
    VLLM_SAMPLING_PARAMS,
    translate_engine_args,
)
from forge.engine.config import EngineConfig, SamplingParams
from forge.trainer.config import TrainerConfig


def _value(key: str, rng: random.Random):
    """A fresh valid value for vLLM engine arg `key` (the EngineConfig field it maps to decides)."""
    if key == "gpu_memory_utilization":
        return round(rng.uniform(0.1, 0.95), 3)
    if key in ("enforce_eager", "trust_remote_code", "disable_custom_all_reduce", "enable_prefix_caching"):
        return rng.random() < 0.5
    if key == "dtype":
        return rng.choice(["float32", "bfloat16", "float16"])
    if key == "block_size":
        return rng.choice([8, 16, 32])
    if key == "tensor_parallel_size":
        return rng.choice([2, 4])
    if VLLM_ENGINE_ARGS[key].only is not None:  # accepted at this value only (test below)
        return VLLM_ENGINE_ARGS[key].only
    return rng.randint(1, 4096)


@pytest.mark.parametrize("key", sorted(k for k, r in VLLM_ENGINE_ARGS.items() if r.only is not None))
def test_a_parallelism_forge_lacks_is_refused_not_ignored(key):
    """pipeline_parallel_size: 2 would run a different layout silently: the app and the Generator refuse it."""
    v = random.randint(2, 8)
    with pytest.raises(ConfigError, match=rf"policy.engine_args.{key}={v}: only 1 is supported"):
        _app({key: v})
    with pytest.raises(ValueError, match=rf"engine_args.{key}={v}: only 1 is supported"):
        _engine_config(None, {key: v})


def _app(engine_args=None, sampling_params=None, **top):
    data = {"policy": {"engine_args": engine_args or {}, "sampling_params": sampling_params or {}}, **top}
    return load_grpo_config(data)


@pytest.mark.parametrize("key", sorted(k for k in VLLM_ENGINE_ARGS if k != ENGINE_ARGS_MODEL))
def test_app_report_and_generator_mapping_agree_on_each_vllm_engine_arg(key):
    rng = random.Random()
    v = _value(key, rng)
    mapped, unused = translate_engine_args({key: v})
    # a tensor-parallel engine has one monarch proc per rank (the app checks procs == the degree)
    top = {"provisioner": "monarch", "services": {"policy": {"procs": v}}} if key == "tensor_parallel_size" else {}
    cfg, report = _app({key: v}, **top)
    gen = _engine_config(None, {key: v})  # the Generator given torchforge's engine_args
    if VLLM_ENGINE_ARGS[key].dest is None:
        assert unused == [key] and mapped == {}
        assert f"policy.engine_args.{key}" in report.unused
        assert gen == EngineConfig()  # nothing the Generator uses either
    else:
        assert unused == [] and f"policy.engine_args.{key}" not in report.unused
        dest = VLLM_ENGINE_ARGS[key].dest
        assert cfg.policy.engine_args[dest] == mapped[dest]  # what the app hands the Generator as `engine`
        assert getattr(gen, dest) == mapped[dest] == EngineConfig.from_dict(cfg.policy.engine_args).__dict__[dest]


def test_every_key_the_generator_maps_is_in_the_table_with_its_meaning():
    import forge.actors.generator as g

    for k, dest in getattr(g, "_VLLM_ENGINE", {}).items():  # its own copy, until it reads the table
        assert VLLM_ENGINE_ARGS[k].dest == dest, k
    assert VLLM_ENGINE_ARGS["enforce_eager"].dest == "enable_cuda_graphs"
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert {r.dest for r in VLLM_ENGINE_ARGS.values() if r.dest} <= fields


def test_vllm_and_forge_spellings_of_one_engine_option_that_disagree_fail_naming_both():
    with pytest.raises(ConfigError, match="gpu_memory_utilization.*gpu_memory_fraction"):
        _app({"gpu_memory_utilization": 0.5, "gpu_memory_fraction": 0.7})
    cfg, _ = _app({"gpu_memory_utilization": 0.5, "gpu_memory_fraction": 0.5})
    assert cfg.policy.engine_args == {"gpu_memory_fraction": 0.5}
    with pytest.raises(ConfigError, match="policy.engine_args.model.*differs"):
        _app({"model": "/elsewhere"}, model="tiny-sft")
    with pytest.raises(ConfigError, match="did you mean 'policy.engine_args.enforce_eager'"):
        _app({"enforce_eagr": True})


def test_app_and_generator_read_vllm_sampling_params_alike():
    rng = random.Random()
    sp = {"top_k": -1, "logprobs": rng.randint(1, 5), "temperature": round(rng.uniform(0.1, 1.5), 3)}
    cfg, _ = _app(sampling_params=sp)
    gen = _sampling_params(None, sp)
    app = SamplingParams.from_dict({"n": 1, **cfg.policy.sampling_params})
    assert app == gen
    assert app.top_k == 0 and app.logprobs is True
    assert set(VLLM_SAMPLING_PARAMS) <= {f.name for f in dataclasses.fields(SamplingParams)}


def _titan_value(key: str, rng: random.Random):
    if key == "training.mixed_precision_param":
        return rng.choice(["float32", "bfloat16"])
    if key == "lr_scheduler.decay_type":
        return "constant"
    if key == "training.max_grad_norm":
        return round(rng.uniform(0.1, 5.0), 3)
    if key.startswith("model.") or key == "checkpoint.folder":
        return f"/ckpt/m{rng.randint(0, 999)}"
    return rng.randint(1, 50)


RENAMES = sorted(k for k, r in TORCHTITAN_TRAINER_KEYS.items() if r.dest and not r.dest.startswith(APP))


@pytest.mark.parametrize("key", RENAMES)
def test_trainer_and_apps_read_each_torchtitan_rename_as_the_table_says(key):
    rng = random.Random()
    v = _titan_value(key, rng)
    block, k = key.split(".")
    dblock, dk = TORCHTITAN_TRAINER_KEYS[key].dest.split(".")
    # the Trainer (its own torchtitan reading) agrees with the table
    assert TrainerConfig.from_dict({block: {k: v}}) == TrainerConfig.from_dict({dblock: {dk: v}})
    # the GRPO app: trainer blocks (model.* in ref_model.model, the trainer trains the top-level model)
    if block == "model":
        cfg, report = load_grpo_config({"ref_model": {"model": {k: v}}})
        assert cfg.ref_model.model.path == v
    else:
        cfg, report = load_grpo_config({"trainer": {block: {k: v}}})
        assert getattr(getattr(cfg.trainer, dblock), dk) == v
    assert not any(u.startswith(f"trainer.{key}") for u in report.unused if not u.startswith("(moved)"))
    # the SFT app's torchforge layout
    if block in ("training", "checkpoint") and key in TORCHFORGE_SFT_KEYS and TORCHFORGE_SFT_KEYS[key]:
        assert TORCHFORGE_SFT_KEYS[key] == f"trainer.{dblock}.{dk}"


@pytest.mark.parametrize("key", sorted(k for k, r in TORCHTITAN_TRAINER_KEYS.items() if r.dest is None))
def test_torchtitan_keys_forge_does_not_use_are_reported_by_every_reader(key):
    block, k = key.split(".")
    v = random.Random().randint(1, 9)
    if block == "model":
        _, report = load_grpo_config({"ref_model": {"model": {k: v}}})
        assert f"ref_model.{key}" in report.unused
    else:
        _, report = load_grpo_config({"trainer": {block: {k: v}}})
        assert f"trainer.{key}" in report.unused
        if key != "checkpoint.enable":  # the Trainer reads `enable: false` as "no checkpoint dir"
            assert key in TrainerConfig.from_dict({block: {k: v}}).unused
    assert TORCHFORGE_SFT_KEYS[key] is None


def test_app_level_torchtitan_keys_are_placed_by_each_app():
    assert {r.dest[len(APP):] for r in TORCHTITAN_TRAINER_KEYS.values() if r.dest and r.dest.startswith(APP)} \
        == set(APP_KEYS)
    n = random.Random().randint(2, 99)
    cfg, report = load_grpo_config({"trainer": {"training": {"steps": n}}})
    assert cfg.steps == n and "(moved) trainer.training.steps -> steps" in report.unused
    with pytest.raises(ConfigError, match="trainer.training.steps.*steps"):
        load_grpo_config({"steps": n + 1, "trainer": {"training": {"steps": n}}})
    assert TORCHFORGE_SFT_KEYS["training.steps"] == "steps"


def test_trainer_model_naming_another_model_is_refused_not_dropped():
    cfg, report = load_grpo_config({"model": "tiny-sft", "trainer": {"model": {"hf_assets_path": "tiny-sft",
                                                                              "name": "qwen3"}}})
    assert "trainer.model.path" in report.unused and "trainer.model.name" in report.unused
    with pytest.raises(ConfigError, match="trainer.model.path: /other"):
        load_grpo_config({"model": "tiny-sft", "trainer": {"model": {"path": "/other"}}})


def test_reference_model_training_keys_of_torchtitan_are_reported_and_dataset_model_must_be_the_model():
    n = random.Random().randint(64, 4096)
    cfg, report = load_grpo_config({"ref_model": {"training": {"seq_len": n, "gc_freq": 1, "max_grad_norm": 1.0,
                                                               "mixed_precision_param": "float32"}}})
    assert {"ref_model.training.seq_len", "ref_model.training.gc_freq",
            "ref_model.training.max_grad_norm"} <= set(report.unused)
    assert cfg.ref_model.training.dtype == "float32"  # torchtitan's name for the dtype the reference runs in
    with pytest.raises(ConfigError, match="dataset.model: /other"):
        load_grpo_config({"model": "tiny-sft", "dataset": {"model": "/other"}})
