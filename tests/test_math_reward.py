"""Math reward on the real GSM8K / MATH answers: gold wrapped as a model writes it scores 1,
a perturbed answer scores 0. A seeded sample of each file keeps the test fast; the full-file
rates come from `python -m experiments.check_math_reward`."""

import json
import os
import random

import pytest

from experiments.check_math_reward import perturb, wrappings
from k15jax.rewards import math as math_reward

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SAMPLE = 300


def _rows(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    random.Random(0).shuffle(rows)
    return rows[:SAMPLE]


@pytest.mark.parametrize("name", ["gsm8k_train.jsonl", "math_train.jsonl"])
def test_gold_scores_one_and_perturbed_zero(name):
    parsed = 0
    for row in _rows(name):
        answer = row["answer"]
        if not math_reward.parse_answer(answer):
            continue
        parsed += 1
        for kind, response in wrappings(answer, row["source"]).items():
            score, info = math_reward.reward(row["prompt"], response, answer)
            assert score == 1.0, (row["id"], kind, info)
        wrong = f"\\boxed{{{perturb(answer, row['source'])}}}"
        assert math_reward.reward(row["prompt"], wrong, answer)[0] == 0.0, row["id"]
    assert parsed >= 0.95 * SAMPLE


@pytest.mark.parametrize(
    "response, want, how",
    [
        ("so \\boxed{\\frac{1}{2}} and \\boxed{3}", "3", "boxed"),
        ("\\boxed{x^{2}+\\frac{1}{2}}", "x^{2}+\\frac{1}{2}", "boxed"),
        ("The answer is 42.", "42", "answer_is"),
        ("we get 1,200 apples and then 7", "7", "last_number"),
        ("no digits here", None, "none"),
    ],
)
def test_extraction(response, want, how):
    assert math_reward.extract_answer(response) == (want, how)


def test_equivalent_forms_and_no_answer():
    assert math_reward.reward("", "\\boxed{0.5}", "\\frac{1}{2}")[0] == 1.0
    assert math_reward.reward("", "\\boxed{(a+2)(a-2)}", "a^2-4")[0] == 1.0
    score, info = math_reward.reward("", "I do not know", "4")
    assert score == 0.0 and info["reason"] == "no answer found"


def test_answers_with_surrounding_newlines():
    # MATH train/precalculus/694: the gold answer is a pmatrix wrapped in newlines.
    gold = "\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n"
    for response in (
        f"The answer is {gold}.",
        f"the final answer is ${gold}$.",
        f"so \\boxed{{{gold}}}",
    ):
        assert math_reward.reward("", response, gold)[0] == 1.0, response
