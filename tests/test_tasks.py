"""Built-in tasks: determinism, disjoint splits, solver traces that the checker accepts;
difficulty estimation and filters through the engine interface."""

import numpy as np
import pytest

from k15jax.data import prompt_sets, tasks
from k15jax.rewards import scoring
from k15jax.rollout.engines import Completion
from k15jax.run import difficulty


def test_deterministic_per_seed_and_seeds_differ():
    a = tasks.generate(50, seed=3)
    assert a == tasks.generate(50, seed=3)
    assert a != tasks.generate(50, seed=4)


def test_held_out_and_train_never_overlap():
    train = {e.prompt for e in tasks.generate(3000, seed=0, max_terms=4)}
    held = {e.prompt for e in tasks.generate(300, seed=0, split="held_out", max_terms=4)}
    assert len(held) == 300 and not train & held
    assert all(tasks.is_held_out(p) for p in held) and not any(tasks.is_held_out(p) for p in train)


def test_every_trace_ends_with_the_right_answer_and_is_accepted():
    examples = tasks.generate(500, seed=1, min_terms=2, max_terms=7, slip_prob=0.3)
    assert {e.difficulty for e in examples} == set(range(2, 8))
    slips = 0
    for e in examples:
        terms = [int(x) for x in e.prompt[len(tasks.PROMPT_PREFIX) :].strip().split("+")]
        assert e.answer == str(sum(terms))
        for trace in (e.long_trace, e.short_trace):
            assert trace.endswith(f"answer: {e.answer}")
            assert tasks.reward(e.prompt, trace, e.answer)[0] == 1.0
        slips += "wrong" in e.long_trace
        # every slip is caught and redone: the line after "wrong" redoes the step correctly
        lines = e.long_trace.split("\n")
        for i, line in enumerate(lines):
            if line.endswith("wrong"):
                a, b = lines[i + 1].removeprefix("redo ").split(",")[0].split("=")
                assert eval(a) == int(b)  # noqa: S307 - a solver-written sum of two ints
        assert len(e.long_trace) > 3 * len(e.short_trace)
    assert slips > 50  # backtracking really appears in the warm-up data


def test_wrong_or_missing_answers_are_rejected():
    assert tasks.reward("Q:2+3\n", "answer: 6", "5")[0] == 0.0
    assert tasks.reward("Q:2+3\n", "2+3=5", "5")[0] == 0.0
    assert tasks.reward("Q:2+3\n", "answer: 4\nanswer: 5", "5")[0] == 1.0


class ScriptedEngine:
    """Answers a prompt right in `right[prompt]` of its samples (a test double of the protocol)."""

    def __init__(self, right):
        self.right = right
        self.seen = []

    def generate(self, prompts, spec):
        out = []
        for i, p in enumerate(prompts):
            text = "".join(chr(c) for c in p)
            self.seen.append(text)
            key = text.split("\n")[0] + "\n"
            for j in range(spec.n):
                ans = "answer: 1" if j < self.right[key] else "answer: -1"
                out.append(Completion(i, [ord(c) for c in ans], [0.0] * len(ans), "stop"))
        return out

    def load_weights(self, params):
        pass


ENCODE = lambda s: [ord(c) for c in s]  # noqa: E731
SCORER = scoring.Scorer(reward_fn=tasks.reward, decode=lambda ids: "".join(chr(c) for c in ids))


def test_pass_rates_and_filters():
    probs = [prompt_sets.Problem(str(i), f"Q:{i}\n", "1") for i in range(4)]
    engine = ScriptedEngine({"Q:0\n": 0, "Q:1\n": 3, "Q:2\n": 10, "Q:3\n": 5})
    rates = difficulty.pass_rates(engine, probs, SCORER, ENCODE, n=10)
    np.testing.assert_allclose(rates, [0.0, 0.3, 1.0, 0.5])
    kept, kept_rates = difficulty.filter_problems(probs, rates)
    assert [p.id for p in kept] == ["0", "1", "3"]
    hack = difficulty.easy_to_hack(engine, probs, SCORER, ENCODE, answer_prefix="answer: ")
    assert engine.seen[-1] == "Q:3\nanswer: "
    np.testing.assert_array_equal(hack, [False, True, True, True])
    kept, _ = difficulty.filter_problems(probs, rates, hackable=hack)
    assert [p.id for p in kept] == ["0"]


def test_column_traces_add_right_and_catch_every_slip():
    """Family "columns": each line restates what is left, the carry and the digits so far; its
    column sum is right (or a slip whose check fails, redone another way); the answer is a+b."""
    examples = tasks.generate(400, seed=2, family="columns", min_digits=1, max_digits=5,
                              slip_prob=0.3)  # fmt: skip
    assert {e.difficulty for e in examples} == set(range(1, 6))
    slips = 0
    for e in examples:
        a, b = e.prompt[len(tasks.PROMPT_PREFIX) :].strip().split("+")
        d = len(a)
        assert len(b) == d == e.difficulty and a[0] != "0" != b[0]
        assert e.answer == str(int(a) + int(b)) and e.short_trace == f"answer: {e.answer}"
        lines = e.long_trace.split("\n")
        assert lines[0] == f"plan: {d} columns, carry, check"
        carry, written = 0, ""
        for j, line in enumerate(lines[1 : d + 1]):
            head, step = line.split(": ", 1)
            x, y = int(a[d - 1 - j]), int(b[d - 1 - j])
            assert head == f"{a[: d - j]}+{b[: d - j]} c{carry}" + (
                f" | {written}" if written else ""
            )
            s = x + y + carry
            if " no, another way " in step:
                slips += 1
                first, redo = step.split(" no, another way ")
                got = int(first.split("=")[1].split()[0])
                assert first == f"{x}+{y}+{carry}={got} back {got - y - carry}" and got != s
                assert redo == f"{y}+{x}+{carry}={s} back {x} ok"
            else:
                assert step == f"{x}+{y}+{carry}={s} back {x} ok"
            carry, written = s // 10, f"{s % 10}{written}"
        assert lines[d + 1] == f"c{carry} | {e.answer}" and lines[d + 2] == f"answer: {e.answer}"
        assert len(lines) == d + 3 and tasks.reward(e.prompt, e.long_trace, e.answer)[0] == 1.0
    assert slips > 100  # noticing a mistake and trying another way appear in the warm-up data
    by_level = {}
    for e in examples:
        by_level.setdefault(e.difficulty, []).append(len(e.long_trace))
    means = [np.mean(by_level[d]) for d in sorted(by_level)]
    assert all(x < y for x, y in zip(means, means[1:]))  # harder problems, longer traces


def test_column_problems_are_deterministic_split_and_checked():
    a = tasks.generate(200, seed=3, family="columns")
    assert a == tasks.generate(200, seed=3, family="columns")
    assert a != tasks.generate(200, seed=4, family="columns")
    held = tasks.generate(100, seed=3, split="held_out", family="columns")
    assert not {e.prompt for e in a} & {e.prompt for e in held}
    assert all(tasks.is_held_out(e.prompt) for e in held)
    for bad in (dict(min_digits=0), dict(min_digits=3, max_digits=2), dict(max_digits=10)):
        with pytest.raises(ValueError, match="digits"):
            tasks.generate(5, seed=0, family="columns", **bad)
    with pytest.raises(ValueError, match="family"):
        tasks.generate(5, seed=0, family="products")
    with pytest.raises(ValueError, match="cannot find"):  # 1-digit sums: 81 problems in all
        tasks.generate(500, seed=0, family="columns", min_digits=1, max_digits=1)
