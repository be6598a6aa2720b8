"""torchforge's GRPO configs (layout copied into tests/fixtures/torchforge) load and run as a
torchforge user would run them: only model/dataset paths, the step count and CPU-sized lengths
changed, plus the placements forge refuses with a clear error (tensor parallelism, FSDP under
the local provisioner, slurm)."""

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch

from apps.grpo.config import buffer_group_size, groups_per_step, load_grpo_config
from forge.config import ConfigError, compose, parse_cli, run_cli, to_container

FIX = Path(__file__).resolve().parent / "fixtures" / "torchforge" / "grpo"
APPS = Path(__file__).resolve().parents[1] / "apps" / "grpo"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    import pandas as pd

    from forge.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tf")
    model = write_tiny_checkpoint(root / "tiny", "qwen2", seed=0)
    d = root / "gsm8k" / "main"  # the hub layout: <path>/<revision>/<split>-*.parquet
    d.mkdir(parents=True)
    rng = random.Random()
    rows = []
    for _ in range(40):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    pd.DataFrame(rows[:32]).to_parquet(d / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[32:]).to_parquet(d / "test-00000-of-00001.parquet")
    return {"model": str(model), "data": str(root / "gsm8k"), "root": str(root)}


def tf_argv(name: str, paths: dict[str, str], *extra: str) -> list[str]:
    return ["--config", str(FIX / f"{name}.yaml"), "--model", paths["model"], "--dataset.path", paths["data"],
            "--trainer.training.steps", "2", "max_req_tokens=48", "max_res_tokens=8", "eval.num_samples=4",
            "~metric_logging.wandb", "+metric_logging.jsonl={}", f"output_dir={paths['root']}/out_{name}", *extra]


def load(argv: list[str]):
    return load_grpo_config(to_container(compose(parse_cli(argv))))


# what forge cannot run yet, per config (each also has a test that it is refused clearly)
NEEDS = {
    "qwen3_1_7b": [],
    "qwen3_8b": ["policy.engine_args.tensor_parallel_size=1", "actors.trainer.procs=1"],
    "qwen3_32b": ["~provisioner", "policy.engine_args.tensor_parallel_size=1", "actors.trainer.procs=1",
                  "services.ref_model.procs=1"],
}


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_torchforge_grpo_config_runs_two_steps(name, paths):
    from apps.grpo.main import main

    cfg, report = load(tf_argv(name, paths, *NEEDS[name]))
    # what the torchforge app means where its config is silent: simple_grpo_loss, beta 0.1, the
    # reference model, math + thinking rewards, GSM8K through the chat template
    assert cfg.loss == {"name": "simple_grpo", "beta": 0.1}
    assert [r["name"] for r in cfg.rewards] == ["math", "thinking"]
    assert cfg.dataset["chat_template"] is True and cfg.dataset["target_format"] == "gsm8k"
    assert len(report.notes) >= 3 and any("beta 0.1" in n for n in report.notes)
    out = asyncio.run(main(cfg))
    assert out["steps"] == 2
    rows = [json.loads(x) for x in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "rl_trainer/avg_loss" in r]
    assert len(trained) == 2
    keys = set().union(*trained)
    assert "loss/kl_ref" in keys  # the reference model ran and fed the KL term
    assert "reward/thinking/mean" in keys
    # torchforge's names for the same quantities, alongside forge's
    for key in ("rl_trainer/learning_rate", "reward/evaluate_response/avg_MathReward_reward",
                "rl_trainer/step/avg_kl_divergence", "generator/generate/count_requests"):
        assert key in keys, key


def test_qwen3_8b_batch_not_a_multiple_of_group_size_is_filled_with_episodes(paths):
    cfg, report = load(tf_argv("qwen3_8b", paths, *NEEDS["qwen3_8b"]))
    assert (cfg.local_batch_size, cfg.group_size) == (12, 8)
    assert buffer_group_size(cfg) is None and groups_per_step(cfg) == 2
    assert any("episodes, not whole groups" in n for n in report.notes)


def test_qwen3_8b_tensor_parallel_generator_needs_monarch_and_matching_procs(paths):
    with pytest.raises(ConfigError, match=r"'services.policy.procs: 4' \(tensor_parallel_size 4\).*provisioner: monarch"):
        load(tf_argv("qwen3_8b", paths))
    # under monarch: one generator proc per tensor-parallel rank (and FSDP across the trainer's procs)
    cfg, report = load(tf_argv("qwen3_8b", paths, "provisioner=monarch"))
    assert cfg.services.policy.procs == cfg.policy.engine_args["tensor_parallel_size"] == 4
    assert "policy.engine_args.tensor_parallel_size" not in report.unused  # honoured, not ignored
    with pytest.raises(ConfigError, match=r"'services.policy.procs: 1' must equal "
                                          r"'policy.engine_args.tensor_parallel_size: 4'"):
        load(tf_argv("qwen3_8b", paths, "provisioner=monarch", "services.policy.procs=1"))


def test_trainer_procs_under_local_provisioner_is_refused_at_config_time(paths):
    with pytest.raises(ConfigError, match=r"'actors.trainer.procs: 2' .* provisioner: monarch"):
        load(tf_argv("qwen3_8b", paths, "policy.engine_args.tensor_parallel_size=1"))
    # under monarch the same placement is accepted (FSDP across the trainer's procs)
    cfg, _ = load(tf_argv("qwen3_8b", paths, "policy.engine_args.tensor_parallel_size=1", "provisioner=monarch"))
    assert cfg.actors.trainer.procs == 2


def test_slurm_launcher_is_a_slurm_job_with_the_services_hosts(paths):
    """torchforge's `launcher: slurm` is honoured: a Monarch SlurmJob whose host groups are the
    services with `hosts` (torchforge allocates per service: hosts x num_replicas nodes each)."""
    from apps.grpo.config import provisioner_options

    cfg, report = load(tf_argv("qwen3_32b", paths, "policy.engine_args.tensor_parallel_size=1"))
    kind, opts = provisioner_options(cfg)
    assert kind == "monarch" and opts["job"] == "slurm"
    assert opts["meshes"] == {"policy": 4, "trainer": 1}  # 4 generator replicas x 1 host, the trainer's host
    assert cfg.services.policy.mesh_name == "policy" and cfg.actors.trainer.mesh_name == "trainer"
    assert cfg.actors.dataset.mesh_name is None and any("actors.dataset.mesh_name 'dataset'" in n for n in report.notes)
    assert not any("launcher" in u for u in report.unused)


def test_metric_logging_torchforge_schema_builds_backends(tmp_path):
    from forge.observability import build_backends

    cfg, _ = load(["--config", str(FIX / "qwen3_1_7b.yaml"), "~metric_logging.wandb"])  # no wandb package here
    backends = build_backends(cfg.metric_logging, total_steps=2, run_dir=tmp_path)  # logging_mode: a TypeError before
    assert [type(b).__name__ for b in backends] == ["ConsoleBackend"]
    for b in backends:
        b.close()
    wandb = load(["--config", str(FIX / "qwen3_1_7b.yaml")])[0].metric_logging["wandb"]
    assert wandb["project"] == "grpo-training" and wandb["logging_mode"] == "global_reduce"


def test_one_key_loss_override_edits_the_default_loss():
    beta = round(random.uniform(0.01, 0.5), 3)
    cfg, report = load(["--config", str(FIX / "qwen3_1_7b.yaml"), f"loss.beta={beta}"])
    assert cfg.loss == {"name": "simple_grpo", "beta": beta}
    # forge's own default keeps its loss and changes only beta
    cfg2, _ = load_grpo_config(to_container(compose(parse_cli([f"loss.beta={beta}"]), APPS / "default.yaml")))
    assert cfg2.loss["name"] == "grpo" and cfg2.loss["beta"] == beta and cfg2.loss["clip_high"] == 0.28


def test_none_on_the_command_line_is_null():
    cfg, _ = load_grpo_config(to_container(compose(parse_cli(["trainer.training.max_norm=None", "--eval.correct_reward",
                                                              "None"]), APPS / "default.yaml")))
    assert cfg.trainer.training.max_norm is None and cfg.eval.correct_reward is None


def test_config_error_prints_the_message_alone_and_exits_2(capsys):
    from apps.grpo.main import cli

    with pytest.raises(SystemExit) as e:
        cli(["--trainer.optimizer.lrr", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'trainer.optimizer.lr'" in err[0] and "Traceback" not in err[0]
    with pytest.raises(ConfigError):  # --debug: the exception itself, with its traceback
        cli(["--trainer.optimizer.lrr", "1", "--debug"])

    def ok(argv):
        return len(argv)

    assert run_cli(ok, ["a", "b"]) == 2


def test_hf_prefix_on_a_local_dir_and_a_cached_bare_hub_id(paths, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from forge.models.hf_io import resolve_model_path

    assert resolve_model_path("hf://" + paths["model"]) == Path(paths["model"])  # torchforge's hf://${model}
    # a bare hub id, cached: resolved from the cache (torchforge's `model: Qwen/Qwen3-1.7B`)
    repo = f"org{random.randint(0, 10**6)}/m"
    snap = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(repo).resolve() == snap.resolve()
    assert resolve_model_path(f"hf://{repo}").resolve() == snap.resolve()
    with pytest.raises(FileNotFoundError, match="neither a local directory nor in the local Hugging Face cache"):
        resolve_model_path("nosuchorg/nosuchmodel")


def test_no_test_split_means_no_held_out_evaluation_and_says_so(paths, tmp_path):
    import shutil

    only_train = tmp_path / "gsm8k" / "main"
    only_train.mkdir(parents=True)
    shutil.copy(Path(paths["data"]) / "main" / "train-00000-of-00001.parquet", only_train)
    cfg, report = load(tf_argv("qwen3_1_7b", paths, f"dataset.path={tmp_path / 'gsm8k'}"))
    assert cfg.eval.num_samples == 0
    assert any("no held-out evaluation" in n for n in report.notes)
    cfg, report = load(tf_argv("qwen3_1_7b", paths))  # the fixture's dataset has a test split: evaluated
    assert cfg.eval.num_samples == 4 and not any("held-out" in n for n in report.notes)


def test_torchforge_gsm8k_prompts_use_the_chat_template_and_system_prompt(paths):
    from forge.data.datasets import PromptDataset

    cfg, _ = load(tf_argv("qwen3_1_7b", paths))
    item = next(iter(PromptDataset(cfg.dataset, tokenizer=paths["model"])))
    assert "<|im_start|>system" in item["request"] and "<answer>" in item["request"]
    assert "<|im_start|>assistant" in item["request"]  # the generation prompt
    assert str(item["target"]).isdigit()  # the number after '####'


def test_torchforge_metric_names_are_logged_alongside():
    from forge.observability.loggers import torchforge_names

    v = {k: random.random() for k in ("rl_trainer/lr", "reward/math/mean", "reward/thinking/mean", "reward/total/mean",
                                      "generator/num_requests", "dataset/epoch", "time/train_s", "loss/kl_ref")}
    out = torchforge_names(v)
    assert out["rl_trainer/learning_rate"] == v["rl_trainer/lr"]
    assert out["reward/evaluate_response/avg_MathReward_reward"] == v["reward/math/mean"]
    assert out["reward/evaluate_response/avg_ThinkingReward_reward"] == v["reward/thinking/mean"]
    assert out["generator/generate/count_requests"] == v["generator/num_requests"]
    assert out["dataset/sample/current_epoch"] == v["dataset/epoch"]
    assert out["rl_trainer/step/avg_kl_divergence"] == v["loss/kl_ref"]
    assert out["main_perf/continuous_training/train_step/duration_avg_s"] == v["time/train_s"]


SFT = FIX.parent / "sft"


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("alpaca")
    rng = random.Random()
    with open(d / "train.jsonl", "w") as f:
        for i in range(24):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"instruction": "Add the numbers.", "input": f"{a} {b}" if i % 2 else "",
                                "output": str(a + b)}) + "\n")
    return str(d)


def sft_argv(name: str, paths: dict[str, str], alpaca: str, *extra: str) -> list[str]:
    return ["--config", str(SFT / f"{name}.yaml"), f"model_name={paths['model']}", f"dataset.path={alpaca}",
            "training.steps=2", "training.local_batch_size=4", "training.seq_len=64", "~metric_logging.wandb",
            "eval.num_samples=2", "eval.every=0", "eval.max_tokens=2", f"output_dir={paths['root']}/sft_{name}", *extra]


def load_sft(argv: list[str]):
    from apps.sft.config import load_sft_config

    return load_sft_config(to_container(compose(parse_cli(argv))))


@pytest.mark.parametrize("name", ["llama3_8b", "qwen3_8b"])
def test_torchforge_sft_config_runs_two_steps(name, paths, alpaca):
    from apps.sft.main import run_sft

    cfg, report = load_sft(sft_argv(name, paths, alpaca, "processes.procs=1"))
    assert cfg.procs == 1 and cfg.model == f"hf://{paths['model']}" and cfg.batch_size == 4 and cfg.max_seq_len == 64
    assert cfg.trainer.optimizer.lr == pytest.approx(1e-5) and cfg.trainer.training.activation_checkpoint is True
    assert cfg.dataset["columns"] == {"prompt": "instruction", "completion": "output"}
    assert "{input}" in cfg.dataset["prompt_template"]  # Alpaca's input column is kept
    assert cfg.trainer.parallelism.tensor_parallel_degree == 1  # torchforge's parallelism block is honoured
    assert "(moved) parallelism -> trainer.parallelism" in report.unused and any("Alpaca" in n for n in report.notes)
    out = run_sft(cfg, quiet=True)
    assert out["steps"] == 2


@pytest.mark.slow
def test_torchforge_sft_config_runs_unchanged_on_its_eight_processes(paths, alpaca):
    """`processes: {procs: 8}` as shipped: FSDP2 over 8 trainer processes (gloo on CPU), same
    steps, a checkpoint and an HF export that loads."""
    from apps.sft.main import run_sft
    from forge.models.hf_io import load_model

    cfg, _ = load_sft(sft_argv("llama3_8b", paths, alpaca, "training.local_batch_size=8", "checkpoint.interval=2"))
    assert cfg.procs == 8 and cfg.with_gpus is True
    out = run_sft(cfg, quiet=True)
    assert out["steps"] == 2 and out["accuracy_after"] is not None
    assert (Path(out["run_dir"]) / "checkpoints").is_dir()
    model = load_model(out["hf_export"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torchforge_sft_unknown_keys_are_named(paths, alpaca):
    with pytest.raises(ConfigError, match="'procs: 0'"):
        load_sft(sft_argv("llama3_8b", paths, alpaca, "processes.procs=0"))
    with pytest.raises(ConfigError, match="unknown key 'training.sq_len'"):
        load_sft(sft_argv("llama3_8b", paths, alpaca, "processes.procs=1", "+training.sq_len=3"))


def test_forge_sft_alpaca_config_keeps_the_input_column(tmp_path):
    from forge.data.datasets import PromptDataset

    cfg, _ = load_sft(["--config", str(APPS.parent / "sft" / "llama3_8b.yaml")])
    word = f"w{random.randint(0, 10**6)}"
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Repeat.", "input": word, "output": word}) + "\n")
    ds = PromptDataset({**cfg.dataset, "path": str(tmp_path / "a.jsonl"), "chat_template": False, "max_epochs": 1})
    assert word in next(iter(ds))["request"]
