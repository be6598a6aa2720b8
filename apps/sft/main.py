"""SFT: cross-entropy on completion tokens only (the prompt is masked), packed micro-batches,
the trainer's checkpoints and resume, held-out eval loss and task accuracy.

    python -m apps.sft.main                                       # tiny model, built-in task, CPU
    python -m apps.sft.main --config apps/sft/llama3_8b.yaml --model /models/Llama-3.1-8B-Instruct
    python -m apps.sft.main --resume                              # continue the last run
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from apps.sft.config import SFTConfig, load_sft_config
from apps.sft.trainers import ActorSFTTrainer, LocalSFTTrainer
from forge.config import compose, parse_cli, run_cli, to_container
from forge.config.help import format_help, wants_help, without_help
from forge.data.datasets import DatasetConfig, PromptDataset
from forge.models.logprobs import compute_logprobs
from forge.models.lora import is_lora, merged_model
from forge.observability import MetricLogger, Reduce, build_backends, record_metric
from forge.trainer.config import TrainerConfig

log = logging.getLogger("forge.sft")
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


def encode_example(tok: Any, item: dict[str, Any], max_len: int) -> tuple[list[int], int]:
    """prompt + completion + eos as ids, and the prompt length (those tokens get no loss).

    The prompt is tokenized exactly as the generator will see it at RL time (the text as is, no
    special tokens added), and the completion separately, so SFT teaches the same boundary."""
    prompt = tok.encode(item["request"], add_special_tokens=False)
    completion = item.get("completion")
    if completion is None:
        completion = item.get("target")
    if completion is None:
        raise ValueError("SFT example has neither a 'completion' nor a 'target' field: map one with "
                         "dataset.columns (e.g. {prompt: question, completion: answer})")
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: SFT appends one so the model learns to stop")
    answer = tok.encode(str(completion), add_special_tokens=False) + [tok.eos_token_id]
    if max_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (one prompt token, one trained token), got {max_len}")
    if len(prompt) + len(answer) > max_len:
        # keep as much completion as fits behind at least one prompt token (the first token of a
        # sequence has no context, so it cannot be trained); cut the prompt's start first
        answer = answer[: max_len - 1]
        prompt = prompt[len(prompt) - (max_len - len(answer)):]
    return prompt + answer, len(prompt)


def make_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tokens and a loss mask that is 1 on completion tokens only."""
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, (ids, p_len) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, max(p_len, 1) : len(ids)] = 1  # token 0 has no prefix to be predicted from
    return {"tokens": tokens, "loss_mask": mask, "lengths": torch.tensor([len(ids) for ids, _ in examples])}


def pad_token(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def batches(ds: PromptDataset, tok: Any, cfg: SFTConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `batch_size` examples, read from `ds` in order (its position is the resume point)."""
    pad = pad_token(tok)
    while True:
        chunk = []
        for item in ds:
            chunk.append(encode_example(tok, item, cfg.max_seq_len))
            if len(chunk) == cfg.batch_size:
                break
        if not chunk:
            return
        yield make_batch(chunk, pad)


class Evaluator:
    """Held-out eval loss (completion tokens) and accuracy (greedy generation, checked exactly)."""

    def __init__(self, cfg: SFTConfig, tok: Any, tokenizer_src: Any):
        self.cfg, self.tok = cfg, tok
        self.items: list[dict[str, Any]] = []
        self.check = None
        if cfg.eval.num_samples <= 0:
            return
        try:
            ds = PromptDataset(dict(cfg.dataset, split=cfg.eval.split, shuffle=False, max_epochs=1), tokenizer=tokenizer_src)
            for item in ds:
                self.items.append(item)
                if len(self.items) >= cfg.eval.num_samples:
                    break
        except Exception as e:  # a file dataset without a held-out split
            log.warning("no held-out evaluation (split '%s'): %s", cfg.eval.split, e)
        if cfg.dataset.get("task"):
            from forge.data.tasks import get_task

            task = get_task(cfg.dataset["task"], **(cfg.dataset.get("task_kwargs") or {}))
            self.check = task.verify
        else:
            from forge.data.rewards import MathReward

            reward = MathReward()
            self.check = lambda response, target: reward("", response, target)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.items:
            return {}
        from forge.engine import EngineConfig, LLMEngine, SamplingParams

        # the engine owns its copy (training weights stay untouched); LoRA: the adapters merged in
        model = (merged_model(model) if is_lora(model) else copy.deepcopy(model)).eval()
        dev = next(model.parameters()).device
        examples = [encode_example(self.tok, it, self.cfg.max_seq_len) for it in self.items]
        batch = make_batch(examples, pad_token(self.tok))
        lp = compute_logprobs(model, batch["tokens"].to(dev), response_mask=batch["loss_mask"].to(dev))
        m = batch["loss_mask"].to(lp.device).float()
        eval_loss = float(-(lp * m).sum() / m.sum().clamp(min=1))
        prompts = [self.tok.encode(it["request"], add_special_tokens=False) for it in self.items]
        longest = max(len(p) for p in prompts) + self.cfg.eval.max_tokens
        engine = LLMEngine(model, EngineConfig(max_num_seqs=min(256, len(prompts)), max_model_len=longest,
                                               kv_cache_tokens=max(longest * min(256, len(prompts)), 256),
                                               enable_cuda_graphs=False),
                           eos_token_ids=[self.tok.eos_token_id], tokenizer=self.tok)
        sp = SamplingParams(temperature=0.0, max_tokens=self.cfg.eval.max_tokens)
        outs = engine.generate([(p, sp) for p in prompts])
        texts = [self.tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs]
        correct = [float(self.check(t, it["target"])) for t, it in zip(texts, self.items)]
        return {"eval/loss": eval_loss, "eval/accuracy": sum(correct) / len(correct)}


def run_sft(cfg: SFTConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    return asyncio.run(train_sft(cfg, resume=resume, quiet=quiet))


async def start_trainer(cfg: SFTConfig, trainer_cfg: TrainerConfig, device: torch.device, run_dir: Path
                        ) -> LocalSFTTrainer | ActorSFTTrainer:
    if cfg.procs == 1:
        return LocalSFTTrainer(trainer_cfg, device)
    return await ActorSFTTrainer.start(trainer_cfg, cfg.procs, cfg.with_gpus, device, run_dir / "eval_weights")


async def train_sft(cfg: SFTConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path

    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.model == "tiny":
        tokenizer_src: Any = str(tiny_tokenizer_path())
        model_spec = {"tiny": cfg.tiny.family, **{k: v for k, v in asdict(cfg.tiny).items() if k != "family"}}
    else:
        from forge.models.hf_io import resolve_model_path

        tokenizer_src = str(resolve_model_path(cfg.model))
        model_spec = {"path": tokenizer_src}
    tok = load_tokenizer(tokenizer_src)
    # typed once and validated here; the trainer (this process or a Trainer actor) receives this object
    trainer_cfg = TrainerConfig(
        model=model_spec, optimizer=cfg.trainer.optimizer, lr_scheduler=cfg.trainer.lr_scheduler,
        training=cfg.trainer.training if cfg.trainer.training.pad_id is not None else replace(
            cfg.trainer.training, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
        lora=cfg.lora, parallelism=cfg.trainer.parallelism,
        checkpoint=replace(cfg.trainer.checkpoint, dir=str(run_dir / "checkpoints"), resume=False))
    trainer_cfg.validate()
    trainer = await start_trainer(cfg, trainer_cfg, device, run_dir)
    try:
        return await _train(cfg, trainer, tok, tokenizer_src, run_dir, resume, quiet)
    finally:
        await trainer.close()


async def _train(cfg: SFTConfig, trainer: LocalSFTTrainer | ActorSFTTrainer, tok: Any, tokenizer_src: Any,
                 run_dir: Path, resume: bool, quiet: bool) -> dict[str, Any]:
    train_ds = PromptDataset(dict(cfg.dataset), tokenizer=tokenizer_src)
    step = 0
    if resume:
        loaded = await trainer.load()
        if loaded is None:
            print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")
        else:
            step = int(loaded["extra"]["step"])
            train_ds.load_state_dict(loaded["extra"]["dataset"])
            print(f"resumed from {loaded['path']} at step {step}")
    start_step = step
    evaluator = Evaluator(cfg, tok, tokenizer_src)
    eval_s = time.perf_counter()
    before = evaluator(await trainer.eval_model()) if evaluator.items else {}
    eval_s = time.perf_counter() - eval_s
    # the progress bar advances once per logged row: the remaining steps, plus the row of `before`
    backends = build_backends(cfg.metric_logging if not quiet else {"jsonl": {}},
                              total_steps=max(cfg.steps - start_step, 0) + bool(before), run_dir=run_dir)
    logger = MetricLogger(backends)

    async def flush(step: int, extra: dict[str, float]) -> None:
        if cfg.procs == 1:  # this process's records only (the GRPO app runs its warm-up inside its own process)
            logger.flush_local(step, extra=extra)
        else:  # and the trainer processes' (grad norm, throughput)
            await logger.flush(step, extra=extra)
    label = "before SFT" if start_step == 0 else f"at step {start_step} (resumed)"
    if before:
        print(f"held-out accuracy {label}: {before['eval/accuracy']:.3f} (eval loss {before['eval/loss']:.3f})")
        await flush(start_step, extra=before)
    ckpt = cfg.trainer.checkpoint

    async def save() -> None:
        await trainer.save(step, {"step": step, "dataset": train_ds.state_dict()})

    t0, eval_before_s = time.perf_counter(), eval_s  # the evaluation before training is not inside [t0, now]
    data = batches(train_ds, tok, cfg)
    after: dict[str, float] | None = None
    while step < cfg.steps:
        batch = next(data, None)
        if batch is None:
            print(f"dataset exhausted after {step} steps")
            break
        ts = time.perf_counter()
        loss = await trainer.sft_step(batch)
        step += 1
        n_tok = int(batch["loss_mask"].sum())
        record_metric("sft/loss", loss, Reduce.MEAN)
        record_metric("sft/tokens_per_s", n_tok / max(time.perf_counter() - ts, 1e-9), Reduce.MEAN)
        extra: dict[str, float] = {}
        if step == cfg.steps or (cfg.eval.every and step % cfg.eval.every == 0):
            te = time.perf_counter()
            extra = evaluator(await trainer.eval_model()) if evaluator.items else {}
            eval_s += time.perf_counter() - te
            if step == cfg.steps:
                after = extra
        await flush(step, extra=extra)  # the last step's row carries the final evaluation
        if ckpt.interval and step % ckpt.interval == 0:
            await save()
    train_s = time.perf_counter() - t0 - (eval_s - eval_before_s)
    if after is None:  # stopped early (data exhausted) or nothing left to do after a resume
        after = evaluator(await trainer.eval_model()) if evaluator.items else {}
        if after:
            await flush(step, extra=after)
    logger.close()
    if ckpt.interval and step % ckpt.interval:  # the final state, unless that step was just saved
        await save()
    summary: dict[str, Any] = {"steps": step, "train_seconds": train_s, "eval_seconds": eval_s, "run_dir": str(run_dir),
                               "accuracy_before": before.get("eval/accuracy"), "accuracy_after": after.get("eval/accuracy"),
                               "eval_loss_before": before.get("eval/loss"), "eval_loss_after": after.get("eval/loss")}
    if cfg.export_hf:
        out = await trainer.export_hf(run_dir / "final_hf")  # LoRA: the adapters merged into the base
        tok.save_pretrained(str(out))
        summary["hf_export"] = str(out)
        if cfg.lora is not None:  # and the adapters in peft format
            summary["adapter_export"] = str(await trainer.save_adapter(run_dir / "final_adapter"))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if after:
        print(f"held-out accuracy: {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
              f"(eval loss {summary['eval_loss_before']:.3f} -> {summary['eval_loss_after']:.3f}) after {step} steps; "
              f"training {train_s:.0f}s + evaluation {eval_s:.0f}s; outputs in {run_dir}")
    return summary


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(_cli, sys.argv[1:] if argv is None else argv)  # a config error: its message, exit 2


def _cli(argv: list[str]) -> dict[str, Any]:
    parsed = parse_cli(without_help(argv), flags=("resume",))
    cfg, report = load_sft_config(to_container(compose(parsed, DEFAULT_CONFIG)))
    if wants_help(argv):
        print(format_help("forge sft", __doc__, SFTConfig, cfg, DEFAULT_CONFIG.parent, {"dataset": DatasetConfig},
                          {"resume": "continue the last run in output_dir"}, DEFAULT_CONFIG), end="")
        return {}
    if report.unused:
        print("config keys forge accepts but does not use: " + ", ".join(report.unused))
    for note in report.notes:
        print(f"using {note}")
    return run_sft(cfg, resume=parsed.flags.get("resume", False))


if __name__ == "__main__":
    cli()
