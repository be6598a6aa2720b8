"""Environments for agentic RL: tools, sandboxed code execution, multi-turn token-space rollouts.

    env = build_env({"_target_": "calculator", "difficulty": 3})
    traj = await run_episode(generate_fn, env, env.task.sample("train", 0), tokenizer,
                             max_turns=3, max_total_tokens=512, max_tokens_per_turn=64)
    episode = traj.to_episode(pad_id=tokenizer.pad_token_id, target=sample["target"])

`forge.envs.openenv.OpenEnvEnvironment` (extra `forge[openenv]`) adapts any OpenEnv server.

Importing `forge.envs` registers the built-in environments (kind "env"), tools ("tool") and
environment tasks ("task") in `forge.config.registry`.
"""

from forge.envs.base import Environment, Observation, build_env, env_factory, register_env
from forge.envs.code import CodeReward, extract_code, python_tool
from forge.envs.openenv import OpenEnvEnvironment
from forge.envs.rollout import Trajectory, record_trajectory_metrics, run_episode, scripted_generate_fn
from forge.envs.sandbox import SandboxConfig, SandboxResult, SandboxUnavailableError, run_python
from forge.envs.tasks import CalculatorEnv, CalculatorTask, CodingEnv, CodingTask, agold_trajectory, calculator_tool, gold_trajectory
from forge.envs.tool_env import ToolEnvironment
from forge.envs.tools import Tool, ToolCall, ToolCallStats, ToolRegistry, parse_tool_calls, tool

__all__ = ["CalculatorEnv", "CalculatorTask", "CodeReward", "CodingEnv", "CodingTask", "Environment",
           "Observation", "OpenEnvEnvironment", "SandboxConfig", "SandboxResult", "SandboxUnavailableError",
           "Tool", "ToolCall",
           "ToolCallStats", "ToolEnvironment", "ToolRegistry", "Trajectory", "agold_trajectory", "build_env",
           "calculator_tool", "env_factory", "extract_code", "gold_trajectory", "parse_tool_calls", "python_tool",
           "record_trajectory_metrics", "register_env", "run_episode", "run_python", "scripted_generate_fn", "tool"]
