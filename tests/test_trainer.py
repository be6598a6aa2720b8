"""Trainer engine: learning, packing == unpacked, micro-batching == one batch, clipping, SFT,
config, bad input, the actor on the local backend and the reference model."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from forge.losses import build_loss
from forge.models.logprobs import compute_logprobs
from forge.observability import drain
from forge.trainer import SFTLoss, TrainerConfig, sft_loss
from forge.trainer.engine import TrainEngine
from forge.trainer.optim import lr_factor
from forge.trainer.packing import pack, sequences_from_rl_batch
from forge.trainer.step import run_microbatch
from forge.trainer.testing import random_rl_batch

TINY = {"tiny": "qwen2", "seed": 0}
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")


def engine(**over) -> TrainEngine:
    cfg = {"model": dict(TINY), "loss": {"name": "grpo", "beta": 0.0}, "optimizer": {"lr": 1e-3}}
    for k, v in over.items():
        cfg[k] = v
    return TrainEngine(cfg)


def grad_spy(e: TrainEngine) -> dict[str, torch.Tensor]:
    """Capture the gradients the optimizer step sees (after clipping)."""
    seen: dict[str, torch.Tensor] = {}
    orig = e.optimizer.step

    def step(*a, **k):
        seen.update({n: p.grad.clone() for n, p in e.model.named_parameters() if p.grad is not None})
        return orig(*a, **k)

    e.optimizer.step = step
    return seen


def test_train_step_reduces_loss_and_records_metrics():
    seed = int(torch.randint(0, 10_000, (1,)))
    e = engine()
    inputs, targets = random_rl_batch(batch=6, seed=seed)
    drain()
    losses = [e.train_step(inputs, targets) for _ in range(6)]
    assert losses[-1] < losses[0] - 1e-3, losses
    keys = {r.key for r in drain()}
    for k in ("rl_trainer/avg_loss", "rl_trainer/grad_norm", "rl_trainer/lr", "rl_trainer/tokens_per_s",
              "loss/entropy", "loss/mismatch_kl"):
        assert k in keys, k
    assert e.step == 6


def _unpacked_reference(model, inputs, targets, loss_fn):
    """Each row alone, no padding at all: prompt (real tokens) + response (real tokens)."""
    tok, pm = inputs[0]["tokens"], inputs[0]["prompt_mask"]
    t = targets[0]
    b, r = t["response"].shape
    p = tok.shape[1] - r
    lp_rows = []
    for i in range(b):
        n = int(t["padding_mask"][i].sum())
        seq = torch.cat([tok[i, :p][pm[i].bool()], tok[i, p:p + n]])[None]
        lp = compute_logprobs(model, seq, response_len=n)
        lp_rows.append(torch.cat([lp[0], lp.new_zeros(r - n)]))
    lp = torch.stack(lp_rows)
    return loss_fn(lp, None, t["advantages"], t["padding_mask"], generator_logprobs=t["generator_logprobs"])


@pytest.mark.parametrize("budget", [10_000, 13])
def test_packing_matches_unpacked_loss_and_gradients(budget):
    seed = int(torch.randint(0, 10_000, (1,)))
    e = engine(training={"max_tokens_per_microbatch": budget})
    inputs, targets = random_rl_batch(batch=5, prompt_len=7, response_len=6, seed=seed)
    loss_fn = build_loss({"name": "grpo", "beta": 0.0, "log_metrics": False})

    ref_model = copy.deepcopy(e.model)
    ref_loss = _unpacked_reference(ref_model, inputs, targets, loss_fn)
    ref_loss.backward()

    seqs = sequences_from_rl_batch(inputs[0]["tokens"], 6, targets[0]["padding_mask"], inputs[0]["prompt_mask"])
    mbs = pack(seqs, 10_000)
    assert len(mbs) == 1 and mbs[0].num_tokens == sum(s.tokens.numel() for s in seqs)  # no padding computed
    assert mbs[0].num_tokens == int(inputs[0]["prompt_mask"].sum() + targets[0]["padding_mask"].sum())
    lp, _ = run_microbatch(e.module, mbs[0], 6)
    packed_loss = loss_fn(lp, None, targets[0]["advantages"], targets[0]["padding_mask"],
                          generator_logprobs=targets[0]["generator_logprobs"])
    packed_loss.backward()
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref_model.named_parameters())
    for n, p in e.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    e.optimizer.zero_grad()
    # the full train_step (with micro-batching by `budget`) reports the same loss
    assert abs(e.train_step(inputs, targets) - ref_loss.item()) < 1e-5


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_microbatching_gives_the_same_update(agg):
    seed = int(torch.randint(0, 10_000, (1,)))
    inputs, targets = random_rl_batch(batch=6, prompt_len=6, response_len=7, seed=seed)
    loss = {"name": "grpo", "beta": 0.0, "agg": agg}
    big = engine(loss=loss, training={"max_tokens_per_microbatch": 4096})
    small = engine(loss=loss, training={"max_tokens_per_microbatch": 12})
    gb, gs = grad_spy(big), grad_spy(small)
    drain()
    l_big = big.train_step(inputs, targets)
    l_small = small.train_step(inputs, targets)
    n_mb = {r.key: r.value for r in drain() if r.key.endswith("num_microbatches")}
    assert abs(l_big - l_small) < 1e-6
    assert big.last_grad_norm == pytest.approx(small.last_grad_norm, rel=1e-5)
    # gradients, not parameters: Adam turns ~1e-10 float noise on zero-gradient params (k_proj
    # bias: softmax is shift invariant) into full-size steps
    for n in gb:
        torch.testing.assert_close(gs[n], gb[n], rtol=1e-4, atol=1e-7, msg=n)
    assert n_mb["rl_trainer/num_microbatches"] > 1  # (last record: the small engine)


def test_grad_clipping_is_applied_and_norm_reported_before_clipping():
    e = engine(training={"max_norm": 1e-3})
    inputs, targets = random_rl_batch(batch=4, seed=int(torch.randint(0, 10_000, (1,))))
    seen = {}
    orig = e.optimizer.step

    def spy(*a, **k):
        seen["norm"] = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in e.module.parameters() if p.grad is not None])).item()
        return orig(*a, **k)

    e.optimizer.step = spy
    e.train_step(inputs, targets)
    assert e.last_grad_norm > 1e-2  # reported pre-clip
    assert seen["norm"] == pytest.approx(1e-3, rel=1e-3)  # what the optimizer saw: clipped


def test_lr_schedule_warmup_and_decay():
    from forge.trainer.config import LRSchedulerConfig

    c = LRSchedulerConfig(warmup_steps=4, decay="cosine", total_steps=14, min_lr_ratio=0.1)
    f = [lr_factor(s, c) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    lin = LRSchedulerConfig(warmup_steps=0, decay="linear", total_steps=10)
    assert lr_factor(5, lin) == pytest.approx(0.5)
    e = engine(lr_scheduler={"warmup_steps": 2}, optimizer={"lr": 0.1})
    inputs, targets = random_rl_batch(seed=1)
    drain()
    e.train_step(inputs, targets)
    e.train_step(inputs, targets)
    lrs = [r.value for r in drain() if r.key == "rl_trainer/lr"]
    assert lrs == pytest.approx([0.05, 0.1])


def test_sft_step_learns_and_ignores_masked_tokens():
    e = engine()
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, (1,))))
    tokens = torch.randint(3, 512, (3, 12), generator=g)
    mask = torch.zeros(3, 12)
    mask[:, 5:10] = 1
    tokens[:, 10:] = 0
    batch = {"tokens": tokens, "loss_mask": mask}
    first = e.sft_step(batch)
    for _ in range(4):
        last = e.sft_step(batch)
    assert last < first
    # direct check of sft_loss
    lp = torch.randn(2, 4)
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1.0]])
    assert sft_loss(lp, m).item() == pytest.approx(-(lp * m).sum().item() / 5)
    lp[0, 3] = float("-inf")  # padding garbage never leaks
    assert torch.isfinite(SFTLoss()(lp, None, None, m))


def test_config_accepts_torchforge_blocks_and_reports_unused():
    cfg = TrainerConfig.from_dict({
        "model": {"name": "qwen3", "flavor": "1.7B", "hf_assets_path": "/x"},
        "optimizer": {"name": "AdamW", "lr": 1e-5, "eps": 1e-8, "implementation": "foreach"},
        "lr_scheduler": {"warmup_steps": 1},
        "training": {"local_batch_size": 4, "seq_len": 2048, "max_norm": 1.0, "steps": 100, "dtype": "bfloat16"},
        "parallelism": {"data_parallel_shard_degree": -1},
        "checkpoint": {"enable": True, "folder": "./c", "interval": 500, "keep_latest_k": 2},
        "activation_checkpoint": {"mode": "selective"},
        "compile": {"enable": False},
    })
    assert cfg.model["path"] == "/x" and cfg.checkpoint.dir == "./c" and cfg.checkpoint.keep_last_n == 2
    assert cfg.training.activation_checkpoint and not cfg.training.compile
    assert "optimizer.implementation" in cfg.unused and "training.seq_len" in cfg.unused
    with pytest.raises(ValueError, match="decay"):
        TrainerConfig.from_dict({"lr_scheduler": {"decay": "cosine"}})
    with pytest.raises(ValueError, match="lr"):
        TrainerConfig.from_dict({"optimizer": {"lr": -1}})


def test_bad_batches_give_clear_errors():
    e = engine()
    inputs, targets = random_rl_batch(seed=2)
    bad = [dict(targets[0], padding_mask=targets[0]["padding_mask"][:, :3])]
    with pytest.raises(ValueError, match="padding_mask has shape"):
        e.train_step(inputs, bad)
    empty_prompt = [dict(inputs[0], prompt_mask=torch.zeros_like(inputs[0]["prompt_mask"]))]
    with pytest.raises(ValueError, match="empty prompt"):
        e.train_step(empty_prompt, targets)
    with pytest.raises(ValueError, match="pad_id"):
        e.train_step([{"tokens": inputs[0]["tokens"]}], targets)
    with pytest.raises(KeyError, match="advantages"):
        e.train_step(inputs, [{k: v for k, v in targets[0].items() if k != "advantages"}])
    assert e.step == 0  # nothing was applied


def test_pad_id_fallback_equals_prompt_mask():
    e = engine(training={"pad_id": 0})
    inputs, targets = random_rl_batch(seed=3)
    a = e.forward_logprobs(inputs, targets)
    b = e.forward_logprobs([{"tokens": inputs[0]["tokens"]}], targets)
    torch.testing.assert_close(a, b)


def test_trainer_actor_and_reference_model_agree():
    from forge.actors.reference_model import ReferenceModel
    from forge.actors.trainer import Trainer
    from forge.controller import shutdown

    async def main():
        trainer = await Trainer.as_actor(model=dict(TINY), loss={"name": "grpo", "beta": 0.1},
                                         optimizer={"lr": 1e-3})
        ref = await ReferenceModel.as_service(model=dict(TINY))
        inputs, targets = random_rl_batch(batch=3, seed=int(torch.randint(0, 10_000, (1,))), with_generator=False)
        ref_lp = await ref.forward.route(inputs, targets)
        t_lp = (await trainer.forward_logprobs.call(inputs, targets))[0]
        torch.testing.assert_close(ref_lp, t_lp, rtol=1e-5, atol=1e-5)
        # the (tokens, response_mask) form gives the same
        lp2 = await ref.forward.route(inputs[0]["tokens"], targets[0]["padding_mask"],
                                      prompt_mask=inputs[0]["prompt_mask"])
        torch.testing.assert_close(lp2, ref_lp)
        assert (ref_lp[targets[0]["padding_mask"] == 0] == 0).all()
        targets[0]["ref_logprobs"] = ref_lp
        losses = [(await trainer.train_step.call(inputs, targets))[0] for _ in range(2)]
        assert all(isinstance(x, float) for x in losses)
        t_lp2 = (await trainer.forward_logprobs.call(inputs, targets))[0]
        assert not torch.allclose(t_lp2, ref_lp)  # the policy moved, the reference did not
        assert torch.equal(await ref.forward.route(inputs, targets), ref_lp)
        await shutdown()

    asyncio.run(main())


def test_trainer_actor_takes_a_typed_config_as_is():
    """The apps validate one TrainerConfig at start and pass that object (no dict round trip); mixing it
    with the dict arguments is an error, not a silent merge."""
    from forge.actors.trainer import Trainer
    from forge.controller import shutdown
    from forge.trainer.config import OptimizerConfig

    lr = float(torch.empty(1).uniform_(1e-4, 1e-2))
    cfg = TrainerConfig(model=dict(TINY), loss={"name": "grpo", "beta": 0.0}, optimizer=OptimizerConfig(lr=lr))
    with pytest.raises(TypeError, match=r"takes no other config arguments, got \['optimizer'\]"):
        Trainer(config=cfg, optimizer={"lr": 1.0})
    with pytest.raises(TypeError, match="must be a forge.trainer.TrainerConfig"):
        Trainer(config={"optimizer": {"lr": lr}})
    assert Trainer(config=cfg).cfg is cfg

    async def main():
        trainer = await Trainer.as_actor(config=cfg)
        inputs, targets = random_rl_batch(batch=2, seed=int(torch.randint(0, 10_000, (1,))), with_generator=False)
        loss = (await trainer.train_step.call(inputs, targets))[0]
        assert isinstance(loss, float)
        await shutdown()

    asyncio.run(main())
    bad = TrainerConfig(model=dict(TINY), optimizer=OptimizerConfig(lr=-lr))
    with pytest.raises(ValueError, match="optimizer.lr must be > 0"):
        TrainEngine(bad)
