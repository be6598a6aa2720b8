"""Environment registry and built-in environment tasks (calculator, coding)."""

from __future__ import annotations

import asyncio

import pytest
from omegaconf import OmegaConf

from forge.config import registry
from forge.envs import CalculatorEnv, CalculatorTask, CodingEnv, CodingTask, Environment, Observation, build_env, env_factory, register_env
from forge.envs.code import CodeReward
from forge.envs.sandbox import sandbox_mode
from forge.errors import InfraError


class CountdownEnv(Environment):
    """A user env, found by import path."""

    def __init__(self, start: int = 3):
        self.start = start
        self.left = start

    async def reset(self, sample):
        self.left = self.start
        return Observation(text=f"count from {self.start}")

    async def step(self, action):
        self.left -= 1
        return Observation(text=str(self.left), done=self.left <= 0, reward=float(self.left <= 0))


def test_build_env_by_name_import_path_and_config():
    env = build_env({"_target_": "calculator", "difficulty": 4})
    assert isinstance(env, CalculatorEnv) and env.task.difficulty == 4 and env.name == "calculator"
    assert isinstance(build_env("coding"), CodingEnv)
    cfg = OmegaConf.create({"env": {"_target_": "tests.test_envs:CountdownEnv", "start": 2}})
    env = build_env(cfg.env)
    # (pytest may import this file as `test_envs` as well as `tests.test_envs`: compare names)
    assert type(env).__name__ == "CountdownEnv" and env.start == 2
    assert type(build_env({"_target_": "tests.test_envs.CountdownEnv"})).__name__ == "CountdownEnv"
    same = CountdownEnv()
    assert build_env(same) is same
    with pytest.raises(KeyError, match="unknown environment"):
        build_env("no_such_env")
    with pytest.raises(ValueError, match="_target_"):
        build_env({"difficulty": 3})
    with pytest.raises(ValueError, match="cannot import"):
        build_env("no.such.module:Env")
    with pytest.raises(TypeError, match="bad arguments"):
        build_env({"_target_": "calculator", "colour": "red"})
    with pytest.raises(TypeError, match="not a forge.envs.Environment"):
        build_env({"_target_": "builtins:dict"})


def test_register_env_and_factory_give_fresh_instances():
    @register_env("test_countdown")
    class Registered(CountdownEnv):
        pass

    try:
        assert registry.lookup("env", "test_countdown") is Registered
        with pytest.raises(ValueError, match="already registered"):
            register_env("test_countdown")(CountdownEnv)
        make = env_factory({"_target_": "test_countdown", "start": 1})
        a, b = make(), make()
        assert isinstance(a, Registered) and a is not b

        async def play():
            await a.reset(None)
            return await a.step("go")

        obs = asyncio.run(play())
        assert obs.done and obs.reward == 1.0
    finally:
        registry.unregister("env", "test_countdown")


def test_calculator_task_splits_difficulty_and_verify():
    task = CalculatorTask(difficulty=4, min_digits=3, seed=1)
    train = [task.sample("train", i) for i in range(50)]
    test = [task.sample("test", i) for i in range(10)]
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in test}
    assert task.sample("train", 7) == train[7]
    for s in train:
        a, b = s["expression"].split("*")
        assert 3 <= len(a) <= 4 and 3 <= len(b) <= 4 and int(s["target"]) == int(a) * int(b)
    s = train[0]
    assert task.verify(f"<answer>{s['target']}</answer>", s["target"]) == 1.0
    assert task.verify(f"<answer>{int(s['target']) + 1}</answer>", s["target"]) == 0.0
    call, answer = task.gold_turns(s)
    assert call == ('<tool_call>{"name":"calculator","arguments":{"expression":"' + s["expression"]
                    + '"}}</tool_call>')
    assert answer == f"<answer>{s['target']}</answer>"
    with pytest.raises(ValueError):
        CalculatorTask(ops="/")
    with pytest.raises(ValueError):
        CalculatorTask(difficulty=2, min_digits=3)


def test_coding_task_variants_and_splits():
    for d in (1, 2, 3):
        task = CodingTask(difficulty=d, seed=0)
        train = [task.sample("train", i) for i in range(20)]
        test = [task.sample("test", i) for i in range(5)]
        assert not {s["prompt"] for s in train} & {s["prompt"] for s in test}
        assert all(len(s["tests"]) == 3 and s["solution"].startswith("```python") for s in train)
        if d == 3:
            assert any("(a, b)" in s["prompt"] for s in train)
    with pytest.raises(ValueError):
        CodingTask(difficulty=4)


def _sandbox_ok() -> bool:
    try:
        sandbox_mode()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _sandbox_ok(), reason="no sandbox")
@pytest.mark.parametrize("venv", ["running", "symlinked"])
def test_coding_env_scores_gold_and_wrong_solutions(venv, tmp_path):
    from tests.test_sandbox import symlinked_venv

    if venv == "running":
        _score_gold_and_wrong(None)
    else:  # issue 21: `.venv -> /tmp/x/.venv` made every gold solution score 0
        with symlinked_venv(tmp_path) as py:
            _score_gold_and_wrong({"python": py})


@pytest.mark.skipif(not _sandbox_ok(), reason="no sandbox")
def test_coding_env_with_unrunnable_interpreter_raises_infra_error(tmp_path):
    broken = tmp_path / ".venv" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.symlink_to(tmp_path / "moved-away" / "python3")

    async def main():
        env = CodingEnv(difficulty=2, sandbox={"python": str(broken)})
        s = env.task.sample("train", 0)
        await env.reset(s)
        with pytest.raises(InfraError, match="moved-away/python3"):
            await env.step(s["solution"])

    asyncio.run(main())
    reward = CodeReward(sandbox={"python": str(broken)}, isolate_tests=True)
    with pytest.raises(InfraError, match="moved-away/python3"):
        reward("p", "```python\ndef f():\n    return 1\n```", ["assert f() == 1"])


def _score_gold_and_wrong(sandbox) -> None:
    async def main():
        env = CodingEnv(difficulty=3, sandbox=sandbox)
        for i in range(4):
            s = env.task.sample("train", i)
            await env.reset(s)
            gold = await env.step(s["solution"])
            assert gold.done and gold.reward == 1.0
            await env.reset(s)
            wrong = await env.step(f"```python\ndef {s['function']}(*a):\n    return 10**9\n```")
            assert wrong.done and wrong.reward == 0.0

    asyncio.run(main())
