"""What the 150-step GRPO learning tests (TP, LoRA) share: a probe of the generator after the last
step, the learning bars, and the check that the generator's final weights are the exported model's."""

from __future__ import annotations

from pathlib import Path

import torch

LEARN_STEPS = 150  # 100 steps were too few: one 100-step TP run rose by only +0.0125 (mean of evaluations)
# bars below every 150-step run measured (docs/perf/NOTES_tp.md, NOTES_lora.md): 200 greedy samples
# move by ~0.03 between evaluations and off_by_n 1's rollouts race the trainer, so each run is one draw
MEAN_BAR, BEST_BAR, END_SLACK = 0.015, 0.03, 0.02
PROBE_TOKENS = 8


class GreedyProbe:
    """An `on_step` hook: after each step the generator replicas' weight versions; after the last one,
    greedy completions of a few held-out prompts (the generator holds the final weights by then)."""

    def __init__(self, last: int) -> None:
        self.last, self.versions, self.greedy, self.prompts = last, [], [], []

    async def __call__(self, step: int, s) -> None:
        self.versions.append(await s.policy.get_version.fanout())
        if step == self.last:
            self.prompts = [s.tokenizer.encode(it["request"]) for it in s.eval_prompts[:4]]
            sampling = {"temperature": 0.0, "max_tokens": PROBE_TOKENS, "ignore_eos": True}
            self.greedy = [(await s.policy.generate.route(token_ids=p, n=1, sampling=sampling))[0]
                           for p in self.prompts]


def assert_learned(out: dict, curve: list[float], what: str) -> None:
    """Held-out accuracy (`curve`: every evaluation, the first at the SFT start) rose over the start."""
    before, after = out["accuracy_before"], out["accuracy_after"]
    assert 0.2 < before < 0.8, f"the SFT warm-up should be partly correct, got {before}"
    assert sum(curve[1:]) / len(curve[1:]) >= before + MEAN_BAR, f"GRPO {what} did not raise held-out accuracy: {curve}"
    assert max(curve[1:]) >= before + BEST_BAR, f"GRPO {what} did not raise held-out accuracy: {curve}"
    assert after >= before - END_SLACK, f"held-out accuracy ended below the SFT start: {curve}"


def assert_generator_holds_export(run: Path, probe: GreedyProbe, version: int) -> None:
    """The generator's final greedy tokens and logprobs equal one process's engine built from the
    exported `final_hf/` (a wrong, stale or unmerged weight would not)."""
    from forge.engine import EngineConfig, LLMEngine, SamplingParams
    from forge.models.hf_io import load_model

    eng = LLMEngine(load_model(run / "final_hf"), EngineConfig(max_num_seqs=8, max_model_len=64, block_size=16),
                    eos_token_ids=[])
    want = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, ignore_eos=True))
                         for p in probe.prompts])
    assert probe.greedy, "the probe ran no greedy completions after the last step"
    for c, w in zip(probe.greedy, want, strict=True):
        assert c.generator_version == version
        assert c.token_ids.tolist() == w.outputs[0].token_ids
        torch.testing.assert_close(c.logprobs, torch.tensor(w.outputs[0].logprobs), atol=1e-4, rtol=0)
