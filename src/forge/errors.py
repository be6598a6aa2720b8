"""Errors shared across layers.

`InfraError` marks a failure of the machinery around a model's answer (a sandbox that could not
start its interpreter, a bwrap error, a reward function that raised or timed out), as opposed to
a wrong answer. Code that scores answers raises it instead of returning 0.0, so an episode hit by
it is marked failed and not trained on, and a metric counts it (`reward/infra_errors`).
"""

from __future__ import annotations


class InfraError(RuntimeError):
    """Infrastructure failure while scoring or executing: never to be read as a wrong answer."""
