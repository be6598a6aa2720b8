"""The trainer's FSDP2 wrapping on a 1-process gloo group (CPU): forward/backward/step work and values are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from forge.models import build_tiny_model, compute_logprobs, load_model, save_model
from forge.trainer.parallel import apply_fsdp  # the one FSDP2 wrapping: the trainer's


@pytest.fixture
def gloo_group(free_port):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_apply_fsdp_one_process(gloo_group, tmp_path):
    ref = build_tiny_model("qwen2", seed=6)
    model = build_tiny_model("qwen2", seed=6)
    apply_fsdp(model, model.model.layers)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    lp_ref = compute_logprobs(ref, tokens, response_len=5)
    lp = compute_logprobs(model, tokens, response_len=5)
    torch.testing.assert_close(lp, lp_ref)
    lp.sum().backward()
    lp_ref.sum().backward()
    g = model.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(g.full_tensor() if hasattr(g, "full_tensor") else g,
                               ref.model.layers[0].mlp.up_proj.weight.grad)
    save_model(model, tmp_path)  # DTensor params are gathered for saving
    torch.testing.assert_close(load_model(tmp_path).model.norm.weight, ref.model.norm.weight)
