"""`OpenEnvEnvironment`: any OpenEnv environment server (`openenv-core`) as a forge `Environment`.

    env = OpenEnvEnvironment("http://localhost:8000")        # action field found from /schema
    obs = await env.reset({"prompt": "...", "seed": 3})
    obs = await env.step(model_text)                          # -> {"<action field>": model_text}

Transport: OpenEnv servers keep per-episode state only on their WebSocket session (`/ws`); their
HTTP `/reset` and `/step` build a fresh environment for every request (openenv-core 0.3). So the
default `transport="ws"` uses openenv's own `GenericEnvClient` (one session per forge env
instance = per episode); `transport="http"` posts to `/reset` and `/step` and suits stateless
(single-step) environments only.

How text maps to OpenEnv's typed actions/observations:
- action: `action_builder(text) -> dict`, else `{action_field: text}`; `action_field` defaults
  to the action schema's only string property (from `GET /schema`).
- observation: `observation_text(obs_dict) -> str`, else `observation_field`, else the only string
  field, else the observation as compact JSON. `reward` and `done` come from OpenEnv's result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from forge.envs.base import Environment, Observation, register_env

_SKIP_FIELDS = {"done", "reward", "metadata"}


def _require_openenv() -> None:
    try:
        import openenv.core  # noqa: F401
    except ImportError as e:
        raise ImportError("OpenEnvEnvironment needs the `openenv-core` package: pip install 'forge[openenv]' "
                          "(or pip install openenv-core)") from e


@register_env("openenv")
class OpenEnvEnvironment(Environment):
    def __init__(self, base_url: str, *, transport: str = "ws", action_field: str | None = None,
                 action_builder: Callable[[str], dict[str, Any]] | None = None,
                 observation_field: str | None = None,
                 observation_text: Callable[[dict[str, Any]], str] | None = None,
                 reset_kwargs: dict[str, Any] | None = None, use_sample_prompt: bool = True,
                 timeout_s: float = 60.0):
        _require_openenv()
        if transport not in ("ws", "http"):
            raise ValueError(f"OpenEnvEnvironment: transport must be 'ws' or 'http', got {transport!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"OpenEnvEnvironment: base_url must be an http(s):// or ws(s):// URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.http_url = self.base_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        self.transport = transport
        self.action_field = action_field
        self.action_builder = action_builder
        self.observation_field = observation_field
        self.observation_text = observation_text
        self.reset_kwargs = dict(reset_kwargs or {})
        self.use_sample_prompt = use_sample_prompt
        self.timeout_s = timeout_s
        self._client: Any = None
        self._http: Any = None
        self.schema: dict[str, Any] | None = None

    # ---- plumbing ------------------------------------------------------------------------------
    async def _get_http(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(base_url=self.http_url, timeout=self.timeout_s, trust_env=False)
        return self._http

    async def _get_client(self) -> Any:
        if self._client is None:
            from openenv.core.generic_client import GenericEnvClient

            self._client = GenericEnvClient(base_url=self.base_url, connect_timeout_s=self.timeout_s,
                                            message_timeout_s=self.timeout_s)
            await self._client.connect()
        return self._client

    async def _action_field(self) -> str:
        if self.action_field is None:
            http = await self._get_http()
            try:
                resp = await http.get("/schema")
                resp.raise_for_status()
                self.schema = resp.json()
            except Exception as e:
                raise RuntimeError(f"OpenEnvEnvironment: cannot read {self.http_url}/schema to find the action field "
                                   f"({e}); pass action_field= or action_builder=") from e
            props = self.schema.get("action", {}).get("properties", {})
            strings = [k for k, v in props.items() if k not in _SKIP_FIELDS and v.get("type") == "string"]
            if len(strings) != 1:
                raise ValueError(f"OpenEnvEnvironment: the action schema has string fields {strings} (need exactly "
                                 f"one to put the model's text in); pass action_field= or action_builder=")
            self.action_field = strings[0]
        return self.action_field

    def _text(self, obs: dict[str, Any]) -> str:
        if self.observation_text is not None:
            return str(self.observation_text(obs))
        if self.observation_field is not None:
            if self.observation_field not in obs:
                raise KeyError(f"OpenEnvEnvironment: observation has no field {self.observation_field!r}: {sorted(obs)}")
            return str(obs[self.observation_field])
        fields = {k: v for k, v in obs.items() if k not in _SKIP_FIELDS}
        strings = [v for v in fields.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)

    def _observation(self, payload_obs: dict[str, Any], reward: Any, done: bool) -> Observation:
        return Observation(text=self._text(payload_obs), reward=float(reward or 0.0), done=bool(done),
                           metadata={"openenv_observation": payload_obs})

    # ---- Environment API -----------------------------------------------------------------------
    async def reset(self, sample: Any) -> Observation:
        kw = dict(self.reset_kwargs)
        if isinstance(sample, dict):
            kw.update(sample.get("reset_kwargs") or {})
            for key in ("seed", "episode_id"):
                if sample.get(key) is not None:
                    kw[key] = sample[key]
        if self.transport == "ws":
            r = await (await self._get_client()).reset(**kw)
            obs = self._observation(r.observation, r.reward, r.done)
        else:
            resp = await (await self._get_http()).post("/reset", json=kw)
            _raise_for(resp, "reset")
            d = resp.json()
            obs = self._observation(d.get("observation", {}), d.get("reward"), d.get("done", False))
        prompt = sample.get("prompt") if isinstance(sample, dict) and self.use_sample_prompt else None
        if isinstance(prompt, str) and prompt:
            obs.text = f"{prompt}\n\n{obs.text}" if obs.text else prompt
        obs.metadata["messages"] = [{"role": "user", "content": obs.text}]
        return obs

    async def step(self, action: str) -> Observation:
        payload = self.action_builder(action) if self.action_builder else {await self._action_field(): action}
        if self.transport == "ws":
            r = await (await self._get_client()).step(payload)
            return self._observation(r.observation, r.reward, r.done)
        resp = await (await self._get_http()).post("/step", json={"action": payload})
        _raise_for(resp, "step")
        d = resp.json()
        return self._observation(d.get("observation", {}), d.get("reward"), d.get("done", False))

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()


def _raise_for(resp: Any, what: str) -> None:
    if resp.status_code >= 400:
        raise RuntimeError(f"OpenEnv {what} failed: HTTP {resp.status_code}: {resp.text[:500]}")


__all__ = ["OpenEnvEnvironment"]
