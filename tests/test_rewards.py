"""forge.data.rewards and forge.actors.reward: extraction, math-verify equivalence, combos, failures."""

import asyncio
import random
import sys
import time
import types

import pytest
from math_verify import parse, verify

from forge.data.rewards import (
    CombinedReward,
    FormatReward,
    LengthPenalty,
    MathReward,
    TaskReward,
    ThinkingReward,
    build_rewards,
    load_reward,
)
from forge.observability import drain, reduce_records

EQUIVALENT = [("0.5", "1/2"), ("0.5", r"\frac{1}{2}"), (r"\dfrac{1}{2}", "1/2"), ("1,200", "1200"),
              ("$42$", "42"), ("42.0", "42"), (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"), ("x^2+2x", "2x+x^2"),
              ("-3", "-3.000")]
DIFFERENT = [("42", "4"), ("4", "42"), ("0.5", "0.25"), (r"\frac{1}{3}", "0.5"), ("x^2", "x^3"), ("7", "-7"),
             ("100", "10")]


def _mv(pred: str, gold: str) -> bool:
    return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))


@pytest.mark.parametrize("pred,gold", EQUIVALENT + DIFFERENT)
def test_math_reward_agrees_with_math_verify(pred, gold):
    m = MathReward()
    expected = 1.0 if _mv(pred, gold) else 0.0
    assert expected == (1.0 if (pred, gold) in EQUIVALENT else 0.0)  # the table itself is right
    for resp in (f"<answer>{pred}</answer>", rf"so the answer is $\boxed{{{pred}}}$.", f"...\n#### {pred}"):
        assert m("p", resp, gold) == expected, resp


def test_math_reward_random_numbers_exact_no_substring_credit():
    m = MathReward()
    rng = random.Random()
    for _ in range(50):
        n = rng.randint(10, 10**6)
        assert m("", f"The total is {n}.", str(n)) == 1.0
        assert m("", f"<answer>{n}</answer>", str(n)[:-1]) == 0.0  # a prefix is not the answer
        assert m("", f"<answer>{n}{rng.randint(0, 9)}</answer>", str(n)) == 0.0
        assert m("", f"<answer>{n:,}</answer>", f"#### {n}") == 1.0  # raw GSM8K target works too
    assert m("", "no number here", "4") == 0.0
    assert m("", "<answer>4</answer> but then 42", "4") == 1.0  # the tag wins over the last number
    assert MathReward(correct_reward=2.0, incorrect_reward=-1.0)("", "<answer>3</answer>", "4") == -1.0


def test_thinking_reward():
    t = ThinkingReward(partial_reward=0.2, full_reward=1.0)
    assert t("", "<think>let me see</think> 42", "42") == 1.0
    assert t("", "< THINK >\nhmm\n</ Think > 42", "") == 1.0
    assert t("", "<think>   </think> 42", "") == 0.2
    assert t("", "<think> 42", "") == 0.2
    assert t("", "42 </think>", "") == 0.2
    assert t("", "42", "") == 0.0 and t("", "", "") == 0.0
    assert ThinkingReward(0.5, 2.0)("", "<think>x</think>", "") == 2.0


def test_format_and_length_rewards():
    f = FormatReward()
    assert f("", "x <answer>3</answer>", "") == 1.0 and f("", "3", "") == 0.0
    strict = FormatReward(pattern=r"<think>.+</think>\s*<answer>.+</answer>", fullmatch=True, penalty=-0.5)
    assert strict("", "<think>a</think> <answer>b</answer>", "") == 1.0
    assert strict("", "junk <think>a</think> <answer>b</answer>", "") == -0.5
    with pytest.raises(ValueError, match="regex"):
        FormatReward(pattern="(")
    lp = LengthPenalty(max_length=100, buffer=20, penalty=1.0)
    assert lp("", "x" * 80, "") == 0.0
    assert lp("", "x" * 90, "") == pytest.approx(-0.5)
    assert lp("", "x" * 100, "") == pytest.approx(-1.0) and lp("", "x" * 500, "") == -1.0


def _user_reward(prompt, response, target, bonus=1.0):
    return bonus if target in response else 0.0


def test_combined_reward_weights_breakdown_and_build_from_config():
    mod = types.ModuleType("my_user_rewards")
    mod.brevity = lambda prompt, response, target: 1.0 if len(response) < 30 else 0.0
    mod.Scaled = type("Scaled", (), {"__init__": lambda self, k=1.0: setattr(self, "k", k),
                                     "__call__": lambda self, p, r, t: self.k})
    sys.modules["my_user_rewards"] = mod
    try:
        combo = build_rewards([
            {"_target_": "MathReward", "weight": 1.0},
            {"name": "thinking", "weight": 0.5, "partial_reward": 0.1},
            {"_target_": "my_user_rewards:brevity", "weight": 0.25},
            {"_target_": "my_user_rewards.Scaled", "k": 3.0, "weight": 2.0, "log_name": "scaled"},
        ])
        assert combo.names == ["math", "thinking", "<lambda>", "scaled"]
        total, parts = combo.score("", "<think>ok</think><answer>7</answer>", "7")
        assert parts == {"math": 1.0, "thinking": 1.0, "<lambda>": 0.0, "scaled": 3.0}
        assert total == pytest.approx(1.0 + 0.5 + 0.0 + 6.0)
        total, parts = combo.score("", "<think></think>7", "8")
        assert parts == {"math": 0.0, "thinking": 0.1, "<lambda>": 1.0, "scaled": 3.0}
        assert total == pytest.approx(0.05 + 0.25 + 6.0)
    finally:
        del sys.modules["my_user_rewards"]
    # mapping form, bound kwargs on a plain function, mean (torchforge) aggregation
    combo = build_rewards({"math": {"weight": 2}, "format": None})
    assert combo("", "<answer>1</answer>", "1") == 3.0
    fn = load_reward(f"{__name__}:_user_reward", bonus=0.3)
    assert fn("", "abc", "b") == 0.3 and CombinedReward([fn]).names == ["_user_reward"]
    mean = CombinedReward([MathReward(), ThinkingReward()], normalize=True)
    assert mean("", "<answer>2</answer>", "2") == 0.5
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        build_rewards(["nope"])
    with pytest.raises(ImportError, match="no_such_module"):
        build_rewards([{"_target_": "no_such_module:fn"}])
    with pytest.raises(ValueError, match="_target_"):
        build_rewards([{"weight": 1.0}])


def test_task_reward():
    r = TaskReward("arithmetic", {"difficulty": 2})
    s = r.task.sample("test", 0)
    assert r(s["prompt"], s["completion"], s["target"]) == 1.0
    assert r(s["prompt"], s["completion"] + "1", s["target"]) == 0.0


# ---- RewardActor ---------------------------------------------------------------------------
def _raises(prompt, response, target):
    raise RuntimeError("boom")


def _hangs(prompt, response, target):
    time.sleep(30)  # stands in for a reward stuck forever; abandoned by the actor's timeout
    return 1.0


def _reduced() -> dict:
    return reduce_records(drain())


def test_reward_actor_batch_breakdown_and_metrics():
    from forge.actors.reward import RewardActor

    async def main():
        drain()
        svc = await RewardActor.options(num_replicas=2).as_service(
            rewards=[{"_target_": "math", "weight": 1.0}, {"_target_": "thinking", "weight": 0.5}])
        rng = random.Random()
        nums = [rng.randint(0, 999) for _ in range(6)]
        responses = [f"<think>t</think><answer>{n}</answer>" if i % 2 else f"<answer>{n + 1}</answer>"
                     for i, n in enumerate(nums)]
        items = await svc.evaluate.route(["p"] * 6, responses, [str(n) for n in nums])
        for i, it in enumerate(items):
            assert it["breakdown"] == ({"math": 1.0, "thinking": 1.0} if i % 2 else {"math": 0.0, "thinking": 0.0})
            assert it["total"] == (1.5 if i % 2 else 0.0) and it["errors"] == {}
        assert await svc.evaluate_response.route(prompt="p", response="<answer>3</answer>", target="3") == 1.0
        m = _reduced()
        assert m["reward/math/mean"] == pytest.approx(4 / 7) and m["reward/total/max"] == 1.5
        assert m["reward/thinking/min"] == 0.0 and m["reward/count"] == 7
        await svc.shutdown()

    asyncio.run(main())


def _infra_cause_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reward infrastructure failure" in r.getMessage()]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_reward_actor_marks_raising_and_hanging_rewards_failed_never_zero(isolation, caplog):
    """A reward that raises or hangs is an infrastructure failure: the item is failed (total NaN, the
    cause named), counted in reward/infra_errors, the first logged; never a 0.0 score (old main: 0.0)."""
    from forge.actors.reward import RewardActor
    from forge.errors import InfraError

    async def main():
        drain()
        # torchforge's form: a list of callables, total = their mean
        svc = await RewardActor.as_service(reward_functions=[MathReward(), _raises, _hangs], timeout_s=1.0,
                                           isolation=isolation)
        t0 = time.monotonic()
        with pytest.raises(Exception, match="boom") as exc:  # the float endpoint raises instead of scoring
            await svc.evaluate_response.route(prompt="p", response="<answer>5</answer>", target="5")
        assert isinstance(getattr(exc.value, "original", exc.value), InfraError)
        assert time.monotonic() - t0 < 10
        n = random.randint(2, 9)
        item = await svc.evaluate_response.route(prompt="p", response=f"<answer>{n}</answer>", target=str(n),
                                                 return_breakdown=True)
        assert item["failed"] and item["total"] != item["total"]  # NaN: no score at all
        assert item["breakdown"]["math"] == 1.0
        assert all(item["breakdown"][k] != item["breakdown"][k] for k in ("_raises", "_hangs"))
        assert "RuntimeError: boom" in item["errors"]["_raises"] and "timeout" in item["errors"]["_hangs"]
        assert "boom" in item["infra_error"] and "_hangs" in item["infra_error"]
        ok = await RewardActor.as_actor(reward_functions=[MathReward()], isolation=isolation)
        good = await ok.evaluate.call_one(["p"], [f"<answer>{n}</answer>"], [str(n)])
        assert good[0]["failed"] is False and good[0]["infra_error"] is None and good[0]["total"] == 1.0
        m = _reduced()
        assert m["reward/errors/_raises"] == 2 and m["reward/errors/_hangs"] == 2
        assert m["reward/timeouts/_hangs"] == 2 and "reward/errors/math" not in m
        assert m["reward/infra_errors"] == 2 and m["reward/count"] == 1  # failed items are not scores
        await svc.shutdown()
        await ok.shutdown()

    with caplog.at_level("ERROR", logger="forge.reward"):
        asyncio.run(main())
    logged = _infra_cause_logged(caplog)
    assert len(logged) == 1 and "boom" in logged[0]  # the first one, with its exact cause


def _reward_threads() -> int:
    import threading

    return sum(t.name == "forge-reward" and t.is_alive() for t in threading.enumerate())


def test_reward_actor_bounds_hung_threads_across_a_batch():
    """Issue 29 item 11: one 64-item evaluate left 64 hung threads under max_abandoned=8 (the bound
    was checked before the calls and appended after their timeouts). The bound is now a slot taken
    before each thread starts; every item is failed (not 0.0)."""
    from forge.actors.reward import RewardActor

    async def main():
        drain()
        before = _reward_threads()
        cap = random.randint(2, 4)
        actor = await RewardActor.as_actor(reward_functions=[_hangs], timeout_s=0.2, max_abandoned=cap,
                                           isolation="thread")
        t0 = time.monotonic()
        items = await actor.evaluate.call_one(["p"] * 64, ["r"] * 64, ["t"] * 64)
        assert time.monotonic() - t0 < 5.0
        assert all(it["failed"] for it in items)
        assert _reward_threads() - before <= cap
        m = _reduced()
        assert m["reward/infra_errors"] == 64 and m["reward/errors/_hangs"] == 64
        await actor.shutdown()

    asyncio.run(main())


def test_reward_actor_process_isolation_kills_only_the_hung_worker():
    from forge.actors.reward import RewardActor

    async def main():
        actor = await RewardActor.as_actor(rewards=["math", f"{__name__}:_sleeps"], timeout_s=3.0,
                                           isolation="process", process_workers=2)
        n = random.randint(10, 99)
        # one item hangs (its worker is killed at 3 s); the other, on the other worker, is unaffected
        items = await actor.evaluate.call_one(["p", "p"], [f"<answer>{n}</answer>", f"<answer>{n}</answer>"],
                                              [str(n), "60"])
        assert items[0]["breakdown"]["math"] == 1.0 and "timeout" in items[0]["errors"]["_sleeps"]
        assert items[1]["failed"] is False and items[1]["breakdown"]["_sleeps"] == 0.5
        # the replacement worker scores the next call
        again = await actor.evaluate.call_one(["p"], [f"<answer>{n}</answer>"], ["61"])
        assert again[0]["failed"] is False and again[0]["breakdown"]["math"] == 0.0
        await actor.shutdown()

    asyncio.run(main())


def _sleeps(prompt, response, target):
    """Hangs when the target is the number in the response; else sleeps briefly and scores 0.5."""
    time.sleep(30 if target not in ("60", "61") else 0.01)
    return 0.5


def test_reward_actor_refuses_unpicklable_rewards_in_processes():
    from forge.actors.reward import RewardActor

    with pytest.raises(ValueError, match="must pickle"):
        RewardActor(reward_functions=[lambda p, r, t: 1.0])
    RewardActor(reward_functions=[lambda p, r, t: 1.0], isolation="thread")  # the thread form takes any callable


def test_abandoned_reward_thread_finishes_without_an_error(monkeypatch):
    """A reward that outlives its timeout still ends cleanly: the caller's timeout must not cancel the
    future the thread later reports into (that raised InvalidStateError inside the thread)."""
    import threading

    from forge.actors.reward import _call_in_daemon_thread

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    value = random.random()

    def slow():
        time.sleep(0.3)
        return value

    async def main():
        fut, thread = _call_in_daemon_thread(slow)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(fut), 0.05)
        return fut, thread

    fut, thread = asyncio.run(main())
    thread.join(5)
    assert not errors, errors
    assert fut.result() == value


# ---- issue 27: answers that must never mis-score --------------------------------------------
def test_math_reward_integers_exact_large_numbers_off_by_one_are_wrong():
    m = MathReward()
    rng = random.Random()
    for _ in range(20):
        n = rng.randint(10**6, 10**12)
        assert m("", f"<answer>{n}</answer>", str(n)) == 1.0
        assert m("", f"<answer>{n + rng.choice([-1, 1])}</answer>", str(n)) == 0.0
        assert m("", f"<answer>{n}.0000001</answer>", str(n)) == 0.0  # an integer target is exact
    assert m("", "<answer>1000001</answer>", "1000000") == 0.0
    assert m("", "<answer>123456789</answer>", "123456790") == 0.0


def test_math_reward_non_integers_absolute_tolerance():
    rng = random.Random()
    for _ in range(20):
        x = round(rng.uniform(-1000, 1000), 3) + 0.0005
        assert MathReward()("", f"<answer>{x + 4e-7:.7f}</answer>", f"{x:.4f}") == 1.0
        assert MathReward()("", f"<answer>{x + 3e-6:.7f}</answer>", f"{x:.4f}") == 0.0
        assert MathReward(tolerance=1e-2)("", f"<answer>{x + 5e-3:.4f}</answer>", f"{x:.4f}") == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        MathReward(tolerance=-1.0)


def test_math_reward_scientific_notation():
    m = MathReward()
    assert m("", "<answer>1e6</answer>", "1000000") == 1.0
    assert m("", "<answer>1e-6</answer>", "0.000001") == 1.0
    assert m("", "<answer>2.5E3</answer>", "2500") == 1.0
    assert m("", "<answer>1e6</answer>", "1000001") == 0.0
    assert m("", "so the result is 3e4", "30000") == 1.0  # the last-number fallback reads exponents


def test_math_reward_answer_first_or_last():
    resp = "<answer>3</answer> wait, no: <answer>4</answer>"
    assert MathReward(answer="first")("", resp, "3") == 1.0 and MathReward(answer="first")("", resp, "4") == 0.0
    assert MathReward()("", resp, "4") == 1.0 and MathReward(answer="last")("", resp, "3") == 0.0
    with pytest.raises(ValueError, match="answer"):
        MathReward(answer="middle")
    combo = build_rewards([{"_target_": "math", "answer": "first"}])
    assert combo("", resp, "3") == 1.0


def test_torchforge_layout_takes_the_first_answer():
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "apps/grpo/qwen3_1_7b.yaml").read_text())
    combo = build_rewards(cfg["rewards"])
    assert combo.rewards[0].answer == "first"


ADVERSARIAL = {
    "unclosed_boxed": "\\boxed{" * 15_000,
    "unclosed_answer": "<answer>" * 12_500,
    "unclosed_think": "<think>" * 14_000,
    "space_runs": ("< " + " " * 2000) * 50,
    "gsm8k_spaces": "#### a" + " " * 100_000 + "b",
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_rewards_are_linear_on_degenerate_rollouts(kind):
    """100k characters of unclosed tags/braces: old main took 6-38 s; every extractor is one pass now."""
    from forge.data.formats import extract_answer, extract_answer_tag, extract_boxed, extract_gsm8k

    text = ADVERSARIAL[kind]
    t0 = time.perf_counter()
    for fn in (extract_boxed, extract_answer_tag, extract_answer, extract_gsm8k):
        fn(text)
    ThinkingReward()("", text)
    FormatReward()("", text)
    MathReward(max_chars=None)("", text, "1")  # what math-verify would choke on is no answer: never sent
    assert time.perf_counter() - t0 < 1.0


def test_extractors_match_the_regex_semantics_on_random_tag_soup():
    """The one-pass scanners pair tags exactly as the lazy regexes did (on inputs small enough for them)."""
    import re

    from forge.data.formats import extract_answer_tag

    rng = random.Random()
    pieces = ["<answer>", "</answer>", "<ANSWER>", "x", " ", "7", "<think>", "</think>", "< think >", "</ think>"]
    think = ThinkingReward()
    for _ in range(300):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = re.findall(r"<answer>(.*?)</answer>", s, re.IGNORECASE | re.DOTALL)
        assert extract_answer_tag(s) == (found[-1].strip() if found else None), s
        assert extract_answer_tag(s, "first") == (found[0].strip() if found else None), s
        blocks = re.findall(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", s, re.IGNORECASE | re.DOTALL)
        old = 1.0 if any(b.strip() for b in blocks) else (0.2 if re.search(r"<\s*/?\s*think\s*>", s, re.I) else 0.0)
        assert think("", s) == old, s
        assert FormatReward()("", s) == (1.0 if re.search(r"<answer>.*?</answer>", s, re.I | re.S) else 0.0), s


def test_math_reward_reads_only_the_last_max_chars():
    m = MathReward(max_chars=50)
    assert m("", "<answer>5</answer>" + "x" * 100, "5") == 0.0  # outside the window
    assert m("", "x" * 100 + "<answer>5</answer>", "5") == 1.0
    assert MathReward(max_chars=None)("", "<answer>5</answer>" + "x" * 100, "5") == 1.0


def test_reward_benchmark_smoke(tmp_path):
    """bench/reward_throughput.py --smoke: runs, writes its JSON record, adversarial inputs within the timeout."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(root / "bench/reward_throughput.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert {"commit", "command", "device", "date"} <= set(data["record"]) and "rows" in data and data["adversarial_within_timeout"]
    kinds = {(r["reward"], r["input"].split("_2")[0]) for r in data["rows"]}
    assert ("math", "realistic_1-8k") in kinds and ("thinking", "adv_unclosed_think") in kinds
    assert all(r["workers"]["completions_per_s"] > 0 for r in data["rows"])


def test_no_math_verify_timeout_warnings_in_reward_threads():
    """math-verify warned "Timeout is disabled" twice at every run (forge turns its SIGALRM timeout off in
    threads): forge bounds the time itself, passes the timeouts explicitly and the warnings are gone."""
    import subprocess

    code = ("import logging, threading; logging.basicConfig(level=logging.WARNING)\n"
            "from forge.data.rewards import MathReward\n"
            "out = []\n"
            "t = threading.Thread(target=lambda: out.append(MathReward()('', '<answer>x^2+2x</answer>', '2x+x^2')))\n"
            "t.start(); t.join(); assert out == [1.0], out\n"
            "assert MathReward()('', '<answer>\\\\frac{1}{2}</answer>', '0.5') == 1.0\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Timeout is disabled" not in proc.stdout + proc.stderr


def test_code_reward_sandbox_failure_is_an_infra_error_not_zero(monkeypatch):
    """Issue 21: a sandbox that cannot start its interpreter raises InfraError (forge.envs.sandbox);
    the code reward lets it through and the reward actor marks the item failed, never 0.0."""
    import forge.envs.code as code_mod
    from forge.actors.reward import RewardActor
    from forge.envs.code import CodeReward
    from forge.errors import InfraError

    cause = f"sandbox: interpreter '/tmp/gone-{random.randint(0, 10**6)}/bin/python' not found"

    def no_sandbox(*args, **kwargs):
        raise InfraError(cause)

    monkeypatch.setattr(code_mod, "run_python", no_sandbox)

    async def main():
        drain()
        actor = await RewardActor.as_actor(reward_functions=[CodeReward()], isolation="thread")
        items = await actor.evaluate.call_one(["p"], ["```python\ndef f():\n    return 1\n```"], [["assert f() == 1"]])
        assert items[0]["failed"] and cause in items[0]["infra_error"]
        assert items[0]["total"] != items[0]["total"]  # NaN, not 0.0
        assert _reduced()["reward/infra_errors"] == 1
        await actor.shutdown()

    asyncio.run(main())
