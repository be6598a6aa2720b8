"""Rewards: `reward(prompt, response, target) -> float` callables, combinable from config.

Built-ins register themselves in `forge.config.registry` (kind "reward") at import."""

from forge.data.rewards.combine import (
    CombinedReward,
    TaskReward,
    build_rewards,
    load_reward,
    reward_name,
)
from forge.data.rewards.format import FormatReward, LengthPenalty, LengthReward, ThinkingReward
from forge.data.rewards.math import MathReward, math_equal
from forge.data.rewards.workers import RewardCallError, RewardTimeout, RewardWorkers

__all__ = ["CombinedReward", "FormatReward", "LengthPenalty", "LengthReward", "MathReward",
           "RewardCallError", "RewardTimeout", "RewardWorkers", "TaskReward", "ThinkingReward", "build_rewards",
           "load_reward", "math_equal", "reward_name"]
