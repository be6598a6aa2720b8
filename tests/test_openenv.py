"""OpenEnv adapter against a real OpenEnv server (openenv-core's create_app + uvicorn) on localhost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

pytest.importorskip("openenv.core", reason="openenv-core not installed (pip install 'forge[openenv]')")

from forge.envs import build_env, run_episode, scripted_generate_fn  # noqa: E402
from forge.envs.openenv import OpenEnvEnvironment  # noqa: E402
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path  # noqa: E402

SERVER = textwrap.dedent('''
    """A guessing game served by openenv-core: stateful per WebSocket session."""
    import random
    from typing import Optional

    from openenv.core.env_server.http_server import create_fastapi_app
    from openenv.core.env_server.interfaces import Environment
    from openenv.core.env_server.types import Action, Observation, State
    from pydantic import Field


    class GuessAction(Action):
        guess: str = Field(..., description="a number")


    class GuessObservation(Observation):
        feedback: str = Field(default="")


    class GuessEnv(Environment):
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            self.secret, self.steps = 0, 0
            self._state = State(episode_id="x", step_count=0)

        def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kw) -> GuessObservation:
            self.secret, self.steps = random.Random(seed).randint(1, 100), 0
            return GuessObservation(feedback="Guess a number between 1 and 100.", done=False, reward=0.0)

        def step(self, action: GuessAction, **kw) -> GuessObservation:
            self.steps += 1
            try:
                g = int(action.guess.strip().split()[-1])
            except (ValueError, IndexError):
                return GuessObservation(feedback="not a number", done=False, reward=-0.1)
            if g == self.secret:
                return GuessObservation(feedback="correct", done=True, reward=1.0)
            return GuessObservation(feedback="higher" if g < self.secret else "lower", done=self.steps >= 8,
                                    reward=0.0)

        @property
        def state(self) -> State:
            return self._state


    app = create_fastapi_app(GuessEnv, GuessAction, GuessObservation, max_concurrent_envs=4)
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    d = tmp_path_factory.mktemp("openenv_server")
    (d / "guess_server.py").write_text(SERVER)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(d), "ENABLE_WEB_INTERFACE": "false", "NO_PROXY": "*"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "guess_server:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            if opener.open(f"{url}/health", timeout=1).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"OpenEnv server did not start: {out[-2000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _secret(seed: int) -> int:
    import random

    return random.Random(seed).randint(1, 100)


def test_reset_step_over_websocket_session(server):
    async def main():
        env = OpenEnvEnvironment(server)  # action field found from /schema
        try:
            obs = await env.reset({"seed": 3})
            assert obs.text == "Guess a number between 1 and 100." and not obs.done
            assert obs.metadata["messages"] == [{"role": "user", "content": obs.text}]
            assert env.action_field is None
            lo, hi = 1, 100
            for _ in range(8):  # binary search: state must persist across steps in the session
                mid = (lo + hi) // 2
                obs = await env.step(f"my guess is {mid}")
                assert env.action_field == "guess"
                if obs.text == "correct":
                    break
                lo, hi = (mid + 1, hi) if obs.text == "higher" else (lo, mid - 1)
            assert obs.done and obs.reward == 1.0 and mid == _secret(3)
            obs = await env.step("banana")
            assert obs.reward == pytest.approx(-0.1) and obs.text == "not a number"
        finally:
            await env.close()

    asyncio.run(main())


def test_rollout_through_openenv_and_registry(server):
    tok = load_tokenizer(tiny_tokenizer_path())
    secret = _secret(11)
    wrong = 1 if secret != 1 else 2

    async def main():
        env = build_env({"_target_": "openenv", "base_url": server, "action_field": "guess"})
        try:
            gen = scripted_generate_fn(tok, [str(wrong), str(secret)])
            return await run_episode(gen, env, {"prompt": "Play the game.", "seed": 11}, tok, max_turns=4,
                                     max_total_tokens=512)
        finally:
            await env.close()

    traj = asyncio.run(main())
    assert traj.stop_reason == "done" and traj.reward == 1.0 and traj.turns == 2
    assert traj.messages[0]["content"] == "Play the game.\n\nGuess a number between 1 and 100."
    assert traj.messages[2] == {"role": "user", "content": "higher" if wrong < secret else "lower"}
    assert sum(traj.loss_mask) == len(tok.encode(str(wrong))) + len(tok.encode(str(secret))) + 2


def test_http_transport_and_errors(server):
    async def main():
        env = OpenEnvEnvironment(server, transport="http", observation_text=lambda o: o["feedback"].upper())
        try:
            obs = await env.reset({"seed": 1})
            assert obs.text == "GUESS A NUMBER BETWEEN 1 AND 100."
            # HTTP /step builds a fresh env per request on the server (stateless): still a valid reply
            obs = await env.step("banana")
            assert obs.text == "NOT A NUMBER" and obs.reward == pytest.approx(-0.1)
        finally:
            await env.close()
        bad = OpenEnvEnvironment(server, action_field="nope", transport="http")
        try:
            await bad.reset({})
            with pytest.raises(RuntimeError, match="HTTP 422"):
                await bad.step("x")
        finally:
            await bad.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="URL"):
        OpenEnvEnvironment("localhost:8000")
    with pytest.raises(ValueError, match="transport"):
        OpenEnvEnvironment(server, transport="grpc")


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openenv.core", None)
    with pytest.raises(ImportError, match=r"forge\[openenv\]"):
        OpenEnvEnvironment("http://127.0.0.1:1")
