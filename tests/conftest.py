"""Helpers shared by several test files (one copy each): a free TCP port, a tiny HF checkpoint."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port()`: a TCP port on 127.0.0.1 that was free a moment ago (for process groups, servers)."""
    return _free_port


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random-init Qwen2 checkpoint (HF layout, tokenizer included), written once per session."""
    from forge.models.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "qwen2", seed=0))


@pytest.fixture(scope="session")
def warmup_cache(tmp_path_factory):
    """One SFT warm-up (the embedded default's `tiny-sft` start) shared by the learning tests of a session."""
    return tmp_path_factory.mktemp("warmup")
