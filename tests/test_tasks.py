"""forge.data.tasks: disjoint deterministic splits, exact verification, the difficulty knob."""

import random

import pytest

from forge.data.tasks import ArithmeticTask, CountdownTask, get_task, safe_eval


@pytest.mark.parametrize("name,kw", [("arithmetic", {"difficulty": 2}), ("arithmetic", {"difficulty": 1}),
                                     ("countdown", {"difficulty": 3}), ("addition", {"difficulty": 3})])
def test_train_test_disjoint_and_deterministic(name, kw):
    seed = random.randrange(10**6)
    task = get_task(name, seed=seed, **kw)
    train = {task.sample("train", i)["prompt"] for i in range(400)}
    test = {task.sample("test", i)["prompt"] for i in range(100)}
    assert train and test and not train & test
    # another seed draws other problems, but the partition (by problem) stays the same
    other = get_task(name, seed=seed + 1, **kw)
    assert not {other.sample("train", i)["prompt"] for i in range(200)} & test
    assert [task.sample("test", i) for i in range(5)] == [get_task(name, seed=seed, **kw).sample("test", i)
                                                        for i in range(5)]
    ds = task.as_dataset("validation", 20)  # "validation" is the test split
    assert ds["prompt"] == [task.sample("test", i)["prompt"] for i in range(20)]


def test_arithmetic_verify_is_exact():
    task = ArithmeticTask(difficulty=3, ops="+-*", seed=random.randrange(1000))
    for i in range(200):
        s = task.sample("train", i)
        a, op, b = s["operands"][0], s["op"], s["operands"][1]
        assert s["prompt"] == f"{a}{op}{b}="
        truth = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert s["target"] == str(truth) == s["completion"] and truth >= 0
        assert task.verify(s["completion"], s["target"]) == 1.0
        assert task.verify(f" {truth}\n7+1=8", s["target"]) == 1.0  # only the first line counts
        assert task.verify(f"<answer>{truth}</answer>", s["target"]) == 1.0
        assert task.verify(str(truth + 1), s["target"]) == 0.0
        assert task.verify(str(truth) + "0", s["target"]) == 0.0
        assert task.verify(str(truth)[:-1], s["target"]) == 0.0 or len(str(truth)) == 1
    assert task.verify("", "5") == 0.0


def test_difficulty_knob_changes_operand_sizes():
    def max_digits(difficulty):
        t = ArithmeticTask(difficulty=difficulty, seed=1)
        return max(len(str(x)) for i in range(300) for x in t.sample("train", i)["operands"])

    assert max_digits(1) == 1 and max_digits(2) == 2 and max_digits(4) == 4
    hard = ArithmeticTask(difficulty=3, min_digits=3)
    assert all(len(str(x)) == 3 for i in range(100) for x in hard.sample("test", i)["operands"])
    counts = {len(CountdownTask(difficulty=d).sample("train", 0)["numbers"]) for d in (2, 3, 5)}
    assert counts == {2, 3, 5}
    with pytest.raises(ValueError, match="min_digits"):
        ArithmeticTask(difficulty=1, min_digits=2)


def test_reversed_and_tagged_answers():
    t = ArithmeticTask(difficulty=3, reverse=True, answer_format="tag")
    s = t.sample("train", 3)
    assert s["target"] == str(s["answer"])[::-1]
    assert s["completion"] == f"<answer>{s['target']}</answer>" and t.verify(s["completion"], s["target"]) == 1.0


def test_countdown_verify():
    task = CountdownTask(difficulty=4, max_number=12, seed=random.randrange(1000))
    for i in range(100):
        s = task.sample("train", i)
        assert task.verify(s["completion"], s["target"]) == 1.0
        assert task.verify(f"<answer>{s['solution']}={s['goal']}</answer>", s["target"]) == 1.0
        assert task.verify(f"{s['solution']}+1", s["target"]) == 0.0
    t = "10 from 2,3,4"
    assert task.verify("2*3+4", t) == 1.0 and task.verify("(4-2)*(3+2)", t) == 0.0  # 2 used twice
    assert task.verify("10", t) == 0.0 and task.verify("4*3-2", t) == 1.0
    assert task.verify("__import__('os').system('true')", t) == 0.0
    assert task.verify("2**3+2", t) == 0.0 and task.verify("20/2", t) == 0.0
    assert CountdownTask(use_all=True).verify("2*3+4", t) == 1.0
    assert CountdownTask(use_all=True).verify("2*5", "10 from 2,5,1") == 0.0
    assert safe_eval("(1+2)*3") == (9, [1, 2, 3])
    with pytest.raises(ValueError, match="countdown target"):
        task.verify("1+1", "2")


def test_registry():
    assert isinstance(get_task("forge.data.tasks:CountdownTask"), CountdownTask)
    with pytest.raises(KeyError, match="unknown task 'nope'.*arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        get_task("arithmetic").sample("dev", 0)
