"""The one scoring rule: correct only when stopped by eos with task reward 1; penalties for
repeats and cuts; the length reward composed per group; evaluation and difficulty agree."""

import numpy as np
import pytest

from k15jax.data import prompt_sets, tasks
from k15jax.rewards import length as length_reward
from k15jax.rewards import scoring
from k15jax.rollout import partial
from k15jax.rollout.engines import Completion
from k15jax.run import difficulty, evaluation
from k15jax.train import losses

ENC = lambda s: [ord(c) for c in s]  # noqa: E731
DEC = lambda ids: "".join(chr(c) for c in ids)  # noqa: E731
SCORER = scoring.Scorer(
    reward_fn=tasks.reward, decode=DEC, truncation_penalty=0.5, repeat_penalty=0.25
)
P = prompt_sets.Problem("p", "Q:1+2\n", "3")


def test_one_definition_of_correct_for_every_finish_reason():
    right, wrong = ENC("answer: 3"), ENC("answer: 4")
    assert SCORER(P, right, "stop") == (1.0, True, {"extracted": "3", "reason": "correct"})
    assert SCORER(P, wrong, "stop")[:2] == (0.0, False)
    # A right answer that then loops is not correct, and earns only the repeat penalty.
    r, ok, info = SCORER(P, right, "repeat")
    assert (r, ok, info["reason"]) == (-0.25, False, "stopped for repetition")
    assert SCORER(P, wrong, "repeat")[:2] == (-0.25, False)
    # Cut at the length limit (by the budget or by an engine's max_tokens): never correct, and
    # the answer-like text it holds is not looked at.
    for reason in ("truncated", "length"):
        assert SCORER(P, right, reason)[:2] == (-0.5, False)
    assert SCORER(P, ENC("3"), "stop", prefix="answer: ")[:2] == (1.0, True)
    with pytest.raises(ValueError, match="finish_reason='eos'"):
        SCORER(P, right, "stop".replace("stop", "eos"))


def _group(problem, responses):
    samples = []
    for text, reason in responses:
        s = partial.Sample(problem, ENC("Q"))
        s.segments.append(partial.Segment(0, ENC(text), [0.0] * len(text)))
        s.finish_reason = reason
        samples.append(s)
    return partial.Group(problem, samples)


def test_score_groups_adds_the_group_length_reward():
    problems = [P, prompt_sets.Problem("q", "Q:2+2\n", "4")]
    groups = [
        _group(0, [("answer: 3", "stop"), ("x answer: 3", "stop"), ("answer: 3xx", "repeat")]),
        _group(1, [("answer: 4", "stop"), ("answer: 5", "stop"), ("answer: 4" * 3, "truncated")]),
    ]
    length = length_reward.LengthPenaltyConfig(weight=0.5, warmup_iterations=2)
    before, correct, stats = scoring.score_groups(
        groups, problems, SCORER, iteration=1, length=length
    )
    np.testing.assert_array_equal(correct, [True, True, False, True, False, False])
    task = np.array([1.0, 1.0, -0.25, 1.0, 0.0, -0.5])
    np.testing.assert_allclose(before, task)  # iteration 1: still in the warm-up
    after, _, stats = scoring.score_groups(groups, problems, SCORER, iteration=2, length=length)
    # By hand, k1.5 §2.3.3: λ = 0.5 - (len - min)/(max - min) per group; correct get λ,
    # incorrect min(0, λ). Group 0 lengths 9, 11, 11: λ = 0.5, -0.5, -0.5.
    # Group 1 lengths 9, 9, 27: λ = 0.5, 0.5, -0.5.
    lam = np.array([0.5, -0.5, -0.5, 0.5, 0.0, -0.5])
    np.testing.assert_allclose(after, task + 0.5 * lam, rtol=1e-6)
    assert stats["accuracy"] == pytest.approx(0.5)
    assert stats["repeats"] == pytest.approx(1 / 6) and stats["truncated"] == pytest.approx(1 / 6)
    assert not any(k.startswith("level/") for k in stats)  # these problems carry no level


def test_score_groups_reports_accuracy_and_length_per_level():
    problems = [
        prompt_sets.Problem("a", "Q:1+2\n", "3", difficulty=2),
        prompt_sets.Problem("b", "Q:2+2\n", "4", difficulty=3),
        prompt_sets.Problem("c", "Q:1+1\n", "2"),  # no level: left out of the per-level keys
    ]
    groups = [
        _group(0, [("answer: 3", "stop"), ("xx answer: 3", "stop")]),
        _group(1, [("answer: 4", "stop"), ("answer: 9 and on", "stop")]),
        _group(2, [("answer: 2", "stop"), ("answer: 2", "stop")]),
    ]
    length = length_reward.LengthPenaltyConfig(weight=0.0, warmup_iterations=0)
    _, _, stats = scoring.score_groups(groups, problems, SCORER, iteration=0, length=length)
    levels = {k: v for k, v in stats.items() if k.startswith("level/")}
    assert levels == {
        "level/2/accuracy": 1.0,
        "level/2/response_length": (9 + 12) / 2,
        "level/2/samples": 2,
        "level/3/accuracy": 0.5,
        "level/3/response_length": (9 + 16) / 2,
        "level/3/samples": 2,
    }
    # A continuous difficulty score (more distinct values than MAX_LEVELS) adds no keys.
    many = [float(i) / 7 for i in range(scoring.MAX_LEVELS + 1)]
    assert scoring.level_stats(many, [True] * len(many), [1] * len(many)) == {}


def test_a_right_answer_that_then_repeats_gets_a_negative_advantage():
    # One group of k = 4 at the default weights: repeat penalty 0.5, length weight 0.1 (after
    # the warm-up). Lengths 9, 18, 9, 13: min 9, max 18, so λ = 0.5 - (len - 9) / 9 =
    # 0.5, -0.5, 0.5, 1/18. Length reward: the correct one λ = 0.5; the others min(0, λ) =
    # -0.5, 0, 0.
    # Totals: 1 + 0.1 * 0.5 = 1.05; the repeat -0.5 + 0.1 * -0.5 = -0.55; 0; 0.
    # Mean 0.5 / 4 = 0.125; advantages 0.925, -0.675, -0.125, -0.125.
    # (When the repeat kept its task reward minus the penalty, 1 - 0.5 = 0.5, its total was
    # 0.45, the mean 0.375 and its advantage +0.075: looping after the answer beat both
    # finished wrong answers.)
    group = _group(0, [("answer: 3", "stop"), ("answer: 3 ok ok ok", "repeat"),
                       ("answer: 4", "stop"), ("answer: 7 hmm", "stop")])  # fmt: skip
    assert [s.length for s in group.samples] == [9, 18, 9, 13]
    scorer = scoring.Scorer(reward_fn=tasks.reward, decode=DEC)  # the default penalties
    length = length_reward.LengthPenaltyConfig(weight=0.1, warmup_iterations=0)
    total, correct, _ = scoring.score_groups([group], [P], scorer, iteration=0, length=length)
    assert correct.tolist() == [True, False, False, False]
    np.testing.assert_allclose(total, [1.05, -0.55, 0.0, 0.0], rtol=1e-6, atol=1e-7)
    advantage = total - losses.group_baseline(total, group_size=4)
    np.testing.assert_allclose(advantage, [0.925, -0.675, -0.125, -0.125], rtol=1e-6)


class _Scripted:
    """Answers every prompt with the same (text, finish reason) list."""

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None):
        return [
            Completion(i, ENC(text), [0.0] * len(text), reason)
            for i in range(len(prompts))
            for text, reason in self.outputs[: spec.n]
        ]


def test_evaluation_and_difficulty_count_what_training_counts():
    outputs = [
        ("answer: 3", "stop"),  # correct
        ("answer: 3", "repeat"),  # right text, but looped: not correct
        ("answer: 3", "length"),  # cut: not correct
        ("answer: 9", "stop"),  # wrong
    ]
    engine = _Scripted(outputs)
    rates = difficulty.pass_rates(engine, [P], SCORER, ENC, n=4)
    np.testing.assert_allclose(rates, [0.25])
    result = evaluation.evaluate(
        engine, [P, P], [ENC(P.prompt)] * 2, SCORER, evaluation.EvalConfig(problems=2, samples=4),
        max_tokens=16, repeat=None, seed=0,
    )  # fmt: skip
    assert result["pass_at_1"] == pytest.approx(0.25)


def test_code_reward_needs_a_sandbox_and_unknown_rewards_are_refused():
    with pytest.raises(ValueError, match="needs a sandbox"):
        scoring.reward_fn("code")
    with pytest.raises(ValueError, match="reward='bleu'"):
        scoring.reward_fn("bleu")
