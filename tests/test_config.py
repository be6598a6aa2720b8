"""forge.config: YAML + CLI overrides as torchforge users type them, validated into dataclasses."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from forge.config import BuildReport, ConfigError, build, compose, load_config, parse_cli, to_container


@dataclass
class Trainer:
    procs: int = 1
    lr: float = 1e-4
    compile: bool = False
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"activation_checkpoint"})


@dataclass
class Grpo:
    beta: float = 0.1
    group_size: int = 4
    loss: Literal["grpo", "gspo", "dapo"] = "grpo"


@dataclass
class AppConfig:
    trainer: Trainer = field(default_factory=Trainer)
    grpo: Grpo = field(default_factory=Grpo)
    seeds: list[int] = field(default_factory=lambda: [0])
    tags: dict[str, str] = field(default_factory=dict)
    run_name: str = "run"
    total: int = 0
    user: str = ""
    model: str | None = None


YAML = """\
trainer:
  procs: 1
  lr: 1e-5
  activation_checkpoint: {mode: selective}
grpo:
  beta: 0.1
  group_size: 8
seeds: [1, 2]
total: ${sum:${trainer.procs},${grpo.group_size}}
user: ${oc.env:FORGE_TEST_USER}
run_name: g${grpo.group_size}
"""


@pytest.fixture
def cfg_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FORGE_TEST_USER", "ada")
    p = tmp_path / "app.yaml"
    p.write_text(YAML)
    return p


def load(argv: list[str]) -> tuple[AppConfig, BuildReport]:
    cfg, report, _ = load_config(argv, AppConfig)
    return cfg, report


def test_yaml_with_space_separated_overrides(cfg_file: Path) -> None:
    cfg, _ = load(["--config", str(cfg_file), "--trainer.procs", "4", "--grpo.beta", "0.2"])
    assert cfg.trainer.procs == 4 and isinstance(cfg.trainer.procs, int)
    assert cfg.grpo.beta == 0.2
    assert cfg.trainer.lr == pytest.approx(1e-5)
    assert cfg.grpo.group_size == 8  # from the file


def test_equals_bare_and_hydra_forms(cfg_file: Path) -> None:
    cfg, _ = load([f"--config={cfg_file}", "--grpo.group_size=3", "trainer.procs=2", "+run_name=x",
                   "--grpo.loss", "gspo"])
    assert (cfg.grpo.group_size, cfg.trainer.procs, cfg.run_name, cfg.grpo.loss) == (3, 2, "x", "gspo")


def test_interpolation_sum_and_env_resolvers(cfg_file: Path) -> None:
    cfg, _ = load(["--config", str(cfg_file), "--trainer.procs", "3"])
    assert cfg.total == 3 + 8  # ${sum:...} sees the override
    assert cfg.run_name == "g8"
    assert cfg.user == "ada"  # ${oc.env:...}
    cfg, _ = load(["--config", str(cfg_file), "--user", "${oc.env:USER,nobody}"])
    assert cfg.user == os.environ.get("USER", "nobody")


def test_override_value_may_interpolate_the_config(cfg_file: Path) -> None:
    cfg, _ = load(["--config", str(cfg_file), "--run_name=b${grpo.beta}-${trainer.procs}", "--trainer.procs", "2"])
    assert cfg.run_name == "b0.1-2"


def test_lists_booleans_null_and_mappings(cfg_file: Path) -> None:
    cfg, _ = load(["--config", str(cfg_file), "--seeds", "[3,4,5]", "--trainer.compile", "true",
                   "--model", "null", "--tags={a: b}"])
    assert cfg.seeds == [3, 4, 5] and cfg.trainer.compile is True and cfg.model is None
    assert cfg.tags == {"a": "b"}
    cfg, _ = load(["--config", str(cfg_file), "--seeds=[]", "--trainer.compile", "False"])
    assert cfg.seeds == [] and cfg.trainer.compile is False


def test_bare_flag_means_true_and_does_not_eat_the_next_argument(cfg_file: Path) -> None:
    parsed = parse_cli(["--trainer.compile", "grpo.beta=0.3", "--x", "~seeds", "--y", "-1", "--resume"])
    assert parsed.overrides == ["trainer.compile=true", "grpo.beta=0.3", "x=true", "y=-1"]
    assert parsed.deletions == ["seeds"] and parsed.flags == {"resume": True}
    cfg, _ = load(["--config", str(cfg_file), "--trainer.compile", "grpo.beta=0.3"])
    assert cfg.trainer.compile is True and cfg.grpo.beta == 0.3


def test_delete_key_restores_default(cfg_file: Path) -> None:
    cfg, _ = load(["--config", str(cfg_file), "~seeds", "~grpo.group_size", "~total", "~run_name"])
    assert cfg.seeds == [0] and cfg.grpo.group_size == 4
    with pytest.raises(ConfigError, match=r"~grpo\.nope"):
        load(["--config", str(cfg_file), "~grpo.nope"])


def test_unknown_key_names_path_and_suggests(cfg_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(["--config", str(cfg_file), "--grpo.bta", "0.2"])
    assert "unknown key 'grpo.bta' — did you mean 'grpo.beta'?" in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown key 'trainer\.porcs' — did you mean 'trainer\.procs'"):
        load(["--config", str(cfg_file), "trainer.porcs=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'") as info:
        load(["--config", str(cfg_file), "zzz=1"])
    assert "did you mean" not in str(info.value)


def test_wrong_type_names_path(cfg_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"'trainer\.procs' must be an integer, got str 'four'"):
        load(["--config", str(cfg_file), "--trainer.procs", "four", "~total"])
    with pytest.raises(ConfigError, match=r"(?s)\$\{sum:\.\.\.\} adds numbers, got 'four'.*full_key: total"):
        load(["--config", str(cfg_file), "--trainer.procs", "four"])
    with pytest.raises(ConfigError, match=r"'trainer\.compile' must be a boolean"):
        load(["--config", str(cfg_file), "--trainer.compile", "3"])
    with pytest.raises(ConfigError, match=r"'seeds\[1\]' must be an integer"):
        load(["--config", str(cfg_file), "--seeds", "[1,x]"])
    with pytest.raises(ConfigError, match=r"'grpo\.loss' must be one of .* — did you mean 'gspo'"):
        load(["--config", str(cfg_file), "--grpo.loss", "gpso"])
    with pytest.raises(ConfigError, match=r"'model' must be a string, got list \[1, 2\] \(or null\)"):
        load(["--config", str(cfg_file), "--model", "[1,2]"])
    with pytest.raises(ConfigError, match=r"'grpo' must be a mapping"):
        load(["--config", str(cfg_file), "~total", "~run_name", "--grpo", "3"])


def test_ignored_keys_are_reported_once(cfg_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="forge.config"):
        _, report = load(["--config", str(cfg_file)])
    assert report.unused == ["trainer.activation_checkpoint"]
    warnings = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(warnings) == 1 and "trainer.activation_checkpoint" in warnings[0]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: '.*missing\.yaml'"):
        load(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(["--config", str(bad)])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load(["--config", str(lst)])
    with pytest.raises(ConfigError, match="needs a YAML path"):
        parse_cli(["--config"])
    with pytest.raises(ConfigError, match="cannot read command-line argument 'oops'"):
        parse_cli(["oops"])


def test_default_yaml_and_multiple_files_merge(tmp_path: Path, cfg_file: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("grpo: {beta: 0.5}\n")
    cfg, _, _ = load_config([], AppConfig, default_yaml=cfg_file)
    assert cfg.grpo.group_size == 8
    cfg, _, _ = load_config(["--config", str(cfg_file), "--config", str(extra)], AppConfig)
    assert cfg.grpo.beta == 0.5 and cfg.grpo.group_size == 8  # later files win, key by key


def test_build_from_plain_dict_and_missing_required() -> None:
    @dataclass
    class Needs:
        path: str
        n: int = 1

    assert build(Needs, {"path": "x"}) == Needs("x", 1)
    with pytest.raises(ConfigError, match="missing required key 'inner.path'"):
        build(Needs, {}, path="inner")
    with pytest.raises(ConfigError, match="cannot resolve config"):
        to_container(compose(parse_cli(["a=${nope}"])))
