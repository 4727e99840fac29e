"""Built-in tasks: determinism, disjoint splits, solver traces that the checker accepts;
difficulty estimation and filters through the engine interface."""

import numpy as np

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
