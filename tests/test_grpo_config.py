from pathlib import Path

import pytest
import torch

from apps.grpo.config import episodes_per_step, load_grpo_config
from apps.grpo.support import weight_sync_config
from forge.config import ConfigError, compose, parse_cli, to_container

APPS = Path(__file__).resolve().parents[1] / "apps" / "grpo"


def load(*argv: str):
    return load_grpo_config(to_container(compose(parse_cli(list(argv)), APPS / "default.yaml")))


def test_default_config_is_the_embedded_default():
    cfg, report = load()
    assert cfg.model == "tiny-sft" and cfg.provisioner == "local"
    assert cfg.dataset["task"] == "arithmetic"
    assert episodes_per_step(cfg) % cfg.group_size == 0
    assert report.unused == []


def test_torchforge_layout_parses_and_reports_unused_keys_once():
    cfg, report = load("--config", str(APPS / "qwen3_1_7b.yaml"), "--model", "/models/q3", "--trainer.optimizer.lr", "2e-6")
    assert cfg.group_size == 8 and cfg.off_by_n == 1
    assert cfg.trainer.optimizer.lr == pytest.approx(2e-6)
    # ${model} interpolation reaches the nested blocks (engine_args.model must repeat the model: checked,
    # then the engine_args are forge's EngineConfig keys, vLLM's translated by forge.config.compat)
    assert cfg.policy.engine_args == {"enable_cuda_graphs": True, "max_model_len": 1024, "tensor_parallel_size": 1}
    assert cfg.ref_model.model.path == "/models/q3"
    assert cfg.dataset["split"] == "train" and cfg.dataset["name"] == "main"
    assert "policy.engine_args.tensor_parallel_size" not in report.unused  # honoured: the generator's TP degree
    assert "trainer.training.gc_freq" in report.unused
    assert len(report.unused) == len(set(report.unused))
    assert cfg.steps == 1000000  # trainer.training.steps (torchforge) -> forge's steps


def test_skill_schema_is_accepted_as_written():
    cfg, report = load("--config", str(APPS / "skill_schema.yaml"))
    assert cfg.group_size == 4  # grpo.n_samples
    assert cfg.loss["name"] == "grpo" and cfg.loss["beta"] == 0.1 and cfg.loss["entropy_coef"] == 0.01
    assert cfg.policy.sampling_params["temperature"] == 0.7
    assert cfg.sync_interval == 10
    assert cfg.services.ref_model.with_gpus is False  # ref_model.with_gpus: false remedy
    assert cfg.actors.trainer.with_gpus is True  # services.trainer -> actors.trainer
    assert episodes_per_step(cfg) == 16  # training.batch_size prompts x n_samples
    assert any("grpo.n_samples -> group_size" in u for u in report.unused)


def test_gsm8k_with_three_gpu_overlay():
    cfg, _ = load("--config", str(APPS / "gsm8k.yaml"), "--config", str(APPS / "three_gpus.yaml"))
    assert cfg.provisioner == "monarch"
    assert cfg.trainer.weight_sync == {}
    sync = weight_sync_config(cfg)  # services on GPUs of their own: NCCL broadcast, bf16 on the wire
    assert sync["transport"] == "broadcast" and sync["num_receivers"] == 1
    # a GPU generator holds bf16: send that; on a host without GPUs everything stays float32
    assert sync.get("dtype") == ("bfloat16" if torch.cuda.is_available() else None)
    assert 0 < sync["port"] < 65536
    assert cfg.dataset["target_format"] == "gsm8k"


def test_weight_sync_transport_follows_the_placement():
    local = weight_sync_config(load()[0])
    assert local["transport"] == "inproc"
    assert local["name"] != weight_sync_config(load()[0])["name"]  # two runs in one process never share a slot
    shared = weight_sync_config(load("--provisioner", "{kind: monarch, share_gpus: true}",
                                     "--services.policy.with_gpus", "true", "--actors.trainer.with_gpus", "true")[0])
    # never NCCL (it cannot pair a GPU with itself): CUDA IPC on a GPU host, else /dev/shm
    assert shared["transport"] == ("cuda_ipc" if torch.cuda.is_available() else "shm")
    overlay = load("--config", str(APPS / "default.yaml"), "--config", str(APPS / "one_gpu_processes.yaml"))[0]
    assert overlay.provisioner == {"kind": "monarch", "share_gpus": True}
    assert weight_sync_config(overlay)["transport"] == shared["transport"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="transport=cuda_ipc needs the trainer and the generator on one CUDA GPU"):
            weight_sync_config(load("--config", str(APPS / "one_gpu_processes.yaml"),
                                    "--trainer.weight_sync.transport", "cuda_ipc")[0])
    multi = weight_sync_config(load("--config", str(APPS / "default.yaml"), "--config", str(APPS / "multi_gpu.yaml"),
                                    "--services.policy.num_replicas", "2")[0])
    assert multi["transport"] == "broadcast" and multi["num_receivers"] == 2
    with pytest.raises(ConfigError, match=r"'services.policy.procs: 2' must equal "
                                          r"'policy.engine_args.tensor_parallel_size: 1'"):
        (load("--config", str(APPS / "default.yaml"), "--config", str(APPS / "multi_gpu.yaml"),
                                "--services.policy.procs", "2")[0])
    # a tensor-parallel generator (procs == tensor_parallel_size): each rank reads its own shard of the
    # published weights, so the default is not the one-copy-per-replica broadcast
    tp = load("--config", str(APPS / "default.yaml"), "--config", str(APPS / "multi_gpu.yaml"),
              "--services.policy.procs", "2", "--policy.engine_args.tensor_parallel_size", "2")[0]
    assert weight_sync_config(tp)["transport"] == "shm"
    with pytest.raises(ValueError, match="transport=broadcast: services.policy.procs must be 1"):
        weight_sync_config(load("--config", str(APPS / "default.yaml"), "--config", str(APPS / "multi_gpu.yaml"),
                                "--services.policy.procs", "2", "--policy.engine_args.tensor_parallel_size", "2",
                                "--trainer.weight_sync.transport", "broadcast")[0])
    # a TP generator on a SLURM job's hosts: shm would reach only the trainer's machine; refused at start
    tp_slurm = ("--provisioner", "{kind: monarch, job: slurm, hosts: 2}", "--services.policy.procs", "2",
                "--policy.engine_args.tensor_parallel_size", "2")
    with pytest.raises(ValueError, match=r"transport='shm' reaches only this machine's processes, but provisioner.job "
                                         r"'slurm' .* not supported yet, got procs=2"):
        weight_sync_config(load(*tp_slurm)[0])
    with pytest.raises(ValueError, match=r"transport='shm' reaches only this machine's processes"):
        weight_sync_config(load("--provisioner", "{kind: monarch, job: attach, workers: ['tcp://10.1.2.3:26600']}",
                                "--trainer.weight_sync.transport", "shm")[0])
    attach_lo = weight_sync_config(load("--provisioner", "{kind: monarch, job: attach, workers: ['tcp://127.0.0.1:26600']}",
                                        "--trainer.weight_sync.transport", "shm")[0])
    assert attach_lo["transport"] == "shm"  # loopback workers are this machine's processes
    with pytest.raises(ValueError, match=r"trainer.weight_sync.transport must be one of .* got 'nccl'"):
        weight_sync_config(load("--trainer.weight_sync.transport", "nccl")[0])
    with pytest.raises(ValueError, match="needs separate processes"):
        weight_sync_config(load("--trainer.weight_sync.transport", "broadcast")[0])


@pytest.mark.parametrize(
    "override, message",
    [
        (("--grpo_bta", "1"), "unknown key 'grpo_bta'"),
        (("--trainer.optimizer.lrr", "1"), "did you mean 'trainer.optimizer.lr'"),
        (("--policy.sampling_params.temprature", "1"), "did you mean 'policy.sampling_params.temperature'"),
        (("--dataset.colums", "{}"), "did you mean 'dataset.columns'"),
        (("--services.policy.procs", "two"), "'services.policy.procs' must be an integer"),
        (("--eval.every", "true"), "'eval.every' must be an integer"),
        (("--trainer.model.flavr", "1.7B"), "did you mean 'trainer.model.flavor'"),
        (("--ref_model.training.dtyp", "float32"), "did you mean 'ref_model.training.dtype'"),
        (("--metric_logging.console.logging_mod", "global_reduce"), "did you mean 'metric_logging.console.logging_mode'"),
        (("--metric_logging.wandb.logging_mode", "per_rank_reduce"), "set logging_mode: global_reduce"),
        (("--loss.name", "grpoo"), "'loss'"),
        (("--loss.bta", "0.1"), "'loss'"),
    ],
)
def test_bad_config_fails_at_start_with_the_dotted_path(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(*override)


def test_skill_schema_unknown_key_is_named():
    with pytest.raises(ConfigError, match="grpo.n_sample"):
        load("--config", str(APPS / "skill_schema.yaml"), "--grpo.n_sample", "3")


# ---------------------------------------------------------------- one source for policy age


@pytest.mark.parametrize("age,off", [(3, 0), (0, 2), (1, 4)])
def test_off_by_n_and_max_policy_age_that_disagree_fail_naming_both(age, off):
    with pytest.raises(ConfigError) as e:
        load("--replay_buffer.max_policy_age", str(age), "--off_by_n", str(off))
    msg = str(e.value)
    assert f"off_by_n: {off}" in msg and f"replay_buffer.max_policy_age: {age}" in msg


def test_consistent_policy_age_keys_resolve_to_one_value():
    import random

    n = random.Random().randint(0, 6)
    for data in ({"off_by_n": n}, {"replay_buffer": {"max_policy_age": n}},
                 {"off_by_n": n, "replay_buffer": {"max_policy_age": n}}):
        cfg, _ = load_grpo_config(data)
        assert cfg.off_by_n == cfg.replay_buffer.max_policy_age == n
    # torchforge's layout writes max_policy_age: ${off_by_n}: an override of off_by_n carries over
    cfg, _ = load("--config", str(APPS / "qwen3_1_7b.yaml"), "--off_by_n", "0")
    assert cfg.off_by_n == cfg.replay_buffer.max_policy_age == 0


def test_sync_interval_needs_an_age_allowance_and_is_not_silently_raised():
    from apps.grpo.config import rollout_ahead

    with pytest.raises(ConfigError) as e:
        load("--sync_interval", "4", "--off_by_n", "1")
    assert "off_by_n: 1" in str(e.value) and "sync_interval: 4" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_grpo_config({"sync_interval": 3, "replay_buffer": {"max_policy_age": 0}})
    assert "replay_buffer.max_policy_age: 0" in str(e.value) and "sync_interval: 3" in str(e.value)
    cfg, _ = load("--sync_interval", "3", "--off_by_n", "2")  # exactly the lag: rollouts wait for each step
    assert cfg.replay_buffer.max_policy_age == 2 and rollout_ahead(cfg) == 0
    # neither key given: one step of run-ahead on top of the sync lag, said in the notes
    cfg, report = load_grpo_config({"sync_interval": 3})
    assert cfg.off_by_n == cfg.replay_buffer.max_policy_age == 3 and rollout_ahead(cfg) == 1
    assert any("off_by_n not set" in n for n in report.notes)
    with pytest.raises(ConfigError, match="sync_interval: 0"):  # main's `step % sync_interval` needs k >= 1
        load("--sync_interval", "0")


# ---------------------------------------------------------------- one placement class


def test_placements_are_the_controllers_actor_options_checked_at_load():
    import random

    from forge.controller import ActorOptions

    n = random.Random().randint(2, 5)
    cfg, _ = load("--services.reward_actor.num_replicas", str(n), "--actors.replay_buffer.restart", "restore")
    assert isinstance(cfg.services.reward_actor, ActorOptions) and cfg.services.reward_actor.num_replicas == n
    assert cfg.actors.replay_buffer.restart == "restore"  # a controller option the app config carries as is
    for argv, where in ((("--services.reward_actor.num_replicas", "0"), "services.reward_actor"),
                        (("--actors.dataset.timeout_s", "-1"), "actors.dataset"),
                        (("--actors.trainer.restart", "sometimes"), "actors.trainer")):
        with pytest.raises(ConfigError, match=where):
            load(*argv)
