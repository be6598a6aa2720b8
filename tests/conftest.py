"""Helpers shared by several test files (one copy each): a free TCP port, a tiny HF checkpoint."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    """One SFT warm-up (the embedded default's `tiny-sft` start) shared by the learning tests of a
    session, built in a fresh process by the app's own `resolve_model`, as a user's first run builds
    it: the warm-up's outcome is sensitive to numerics (held-out 0.29-0.47 seen across CPU kernels
    and thread counts), so it must not depend on what the test process did before."""
    cache = tmp_path_factory.mktemp("warmup")
    code = ("import sys; from tests.test_grpo_app import config; from apps.grpo.support import resolve_model; "
            "print(resolve_model(config('--warmup.cache_dir', sys.argv[1])))")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(cache)], cwd=root, check=True, timeout=1800)
    return cache
