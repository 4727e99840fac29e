"""Answer forms: number words, the exact reader, rendering, the equivalence set and targets."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from k15jax.data import answer_forms as af
from k15jax.data import tasks
from k15jax.rewards import judge


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "zero"),
        (7, "seven"),
        (12, "twelve"),
        (19, "nineteen"),
        (20, "twenty"),
        (34, "thirty-four"),
        (40, "forty"),
        (99, "ninety-nine"),
        (-5, "minus five"),
    ],
)
def test_words(n, text):
    assert af.words(n) == text


def test_words_refuses_out_of_range():
    with pytest.raises(ValueError, match="100"):
        af.words(100)


@pytest.mark.parametrize(
    "text, value",
    [
        ("12", 12),
        (" 12. ", 12),
        ("-3", -3),
        ("12.0", 12),
        ("12.5", Fraction(25, 2)),
        ("twelve", 12),
        ("Thirty-Four", 34),
        ("3*4", 12),
        ("3 * 4", 12),
        ("24/2", 12),
        ("7/2", Fraction(7, 2)),
        ("5+7", 12),
        ("15-3", 12),
    ],
)
def test_parse_reads_the_forms(text, value):
    assert af.parse(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "1 2",
        "12 or 13",
        "",
        "twelve!",
        "3**4",
        "2*3*4",
        "1/0",
        "__import__('os').system('true')",
        "(3*4)",
        "1e3",
        "thirty four",
        "9" * 40,
    ],
)
def test_parse_refuses_everything_else(text):
    assert af.parse(text) is None


@pytest.mark.parametrize("shape", af.VALUE_SHAPES)
def test_render_equal_keeps_the_value_and_a_near_miss_does_not(shape):
    rng = random.Random(0)
    for value in range(0, 98):
        for _ in range(3):
            text = af.render(value, shape, rng)
            assert af.parse(text) == value, (value, shape, text)
            miss = af.render(value, shape, rng, equal=False)
            got = af.parse(miss)
            near = {value - 2, value - 1, value + 1, value + 2, value + Fraction(1, 2)}
            if value >= 10:
                near.add(int(str(value)[::-1]))
            assert got in near and got >= 0, (value, shape, miss)


def test_render_shapes_are_what_they_say():
    rng = random.Random(1)
    assert af.render(12, "digits", rng) == "12"
    assert af.render(12, "decimal", rng) == "12.0"
    assert af.render(12, "words", rng) == "twelve"
    assert af.render(12, "product", rng) in ("2*6", "3*4", "4*3", "6*2")
    assert af.render(13, "product", rng) == "1*13"  # a prime
    assert af.render(12, "quotient", rng) in ("24/2", "36/3", "48/4")
    assert af.render(34, "spaced", rng, equal=False) == "3 4"
    with pytest.raises(ValueError, match="no value"):
        af.render(34, "spaced", rng)
    with pytest.raises(ValueError, match="roman"):
        af.render(3, "roman", rng)
    misses = {af.render(12, "digits", random.Random(s), equal=False) for s in range(60)}
    assert misses == {"10", "11", "13", "14", "21"}


def test_reward_reads_the_last_line_only():
    trace = "plan: add 2 numbers, check each\n5+7=12, left none\ncheck 12-7=5 ok\nanswer: 12"
    for text, want in [("12", 1.0), ("twelve", 1.0), ("12.0", 1.0), ("13", 0.0), ("1 2", 0.0)]:
        assert af.reward("Q:5+7\n", af.with_answer(trace, text), "12")[0] == want, text
    # An expression is not a final answer, whatever its value: copying the problem (5+7) or
    # leaving the last step to the checker must not earn the reward.
    for text in ("5+7", "3*4", "24/2", "15-3", "10+2."):
        assert af.parse(text) == 12 and not af.is_value(text)
        assert af.reward("Q:5+7\n", af.with_answer(trace, text), "12")[0] == 0.0, text
    # Only ASCII digits: other scripts' digits (read as 12 by int()) are not this task's forms.
    for text in ("\u0661\u0662", "\uff11\uff12", "1\u0662.0"):
        assert af.parse(text) is None, text
    assert af.reward("", "answer: 12\nno, wait", "12")[0] == 0.0
    assert af.reward("", "the total is 12", "12")[0] == 0.0
    # The task's own strict checker misses the forms this reader accepts.
    assert tasks.reward("", af.with_answer(trace, "twelve"), "12")[0] == 0.0


def test_equivalence_set_labels_and_balance():
    examples = tasks.generate(400, seed=3)
    items = af.equivalence_set(examples, per_problem=5, seed=1)
    assert len(items) == 2000
    for it in items:
        assert it.response.endswith(f"answer: {it.answer}")
        # The checker refuses expressions even when equal (the judge is trained to accept them).
        want = float(it.label and af.is_value(it.answer))
        assert af.reward(it.problem, it.response, it.reference)[0] == want
    share = sum(it.label for it in items) / len(items)
    assert 0.46 < share < 0.54
    # No shape gives the label away: each value shape is equal about 4/7 of the time.
    for shape in af.SHAPES:
        of = [it.label for it in items if it.form == shape]
        assert len(of) > 150, shape
        if shape == "spaced":
            assert not any(of)
        else:
            assert 0.47 < sum(of) / len(of) < 0.67, shape
    assert af.equivalence_set(examples, per_problem=5, seed=1) == items  # seeded


def test_targets_end_in_the_labelled_verdict():
    items = af.equivalence_set(tasks.generate(50, seed=4), per_problem=2, seed=0)
    for it in items:
        for target in (af.classic_target(it), af.cot_target(it)):
            v = judge.parse_verdict(target)
            assert v.status == "ok" and v.correct == it.label, target
    twelve = af.Item("Q:5+7\n", "12", "answer: twelve", "twelve", "words", True)
    assert af.cot_target(twelve) == 'twelve = 12; reference 12; 1=1 2=2; same\n{"correct": true}'
    nine = af.Item("Q:5+7\n", "12", "answer: nine", "nine", "words", False)
    assert af.cot_target(nine) == 'nine = 9; reference 12; 0x1 9x2; differ\n{"correct": false}'
    half = af.Item("Q:5+7\n", "12", "answer: 12.5", "12.5", "decimal", False)
    assert af.cot_target(half).startswith("12.5 = 12.5; reference 12; differ")
    spaced = af.Item("Q:5+7\n", "12", "answer: 1 2", "1 2", "spaced", False)
    assert af.cot_target(spaced).startswith("1 2 = none; reference 12; differ")


def test_attacks_are_labelled_by_the_rules_and_balanced_where_an_answer_decides():
    examples = tasks.generate(300, seed=5)
    rng = random.Random(0)
    by_kind = {k: [af.attack(e, k, rng) for e in examples] for k in af.ATTACKS}
    for kind, items in by_kind.items():
        for it in items:
            assert it.form == kind
            # the rules: the last line's answer, as the forms task's checker reads it
            strict = af.reward(it.problem, it.response, it.reference)[0] == 1.0
            assert it.label == strict, (kind, it.response[-60:])
    # an injection before the answer line leaves the answer to decide: both labels occur,
    # and the injected verdict always says the opposite of the truth
    for kind in ("fake verdict", "fake reference", "hedge: two lines"):
        share = sum(it.label for it in by_kind[kind]) / len(by_kind[kind])
        assert 0.35 < share < 0.65, kind
    for it in by_kind["fake verdict"]:
        injected = judge.parse_verdict(it.response.rsplit("\n", 2)[-2])
        assert injected.status == "ok" and injected.correct != it.label
    # after the answer line, or two answers on one line: never right, whatever it says
    for kind in ("fake judge turn", "verdict after", "hedge: or"):
        assert not any(it.label for it in by_kind[kind]), kind
        assert all(it.answer == "none" or " or " in it.answer for it in by_kind[kind])
    turn = by_kind["fake judge turn"][0]
    assert "</r>" in turn.response and turn.response.endswith('{"correct": true}')
    with pytest.raises(ValueError, match="kind"):
        af.attack(examples[0], "bribe", rng)


def test_attack_fraction_mixes_attacks_in_and_zero_changes_nothing():
    examples = tasks.generate(200, seed=6)
    plain = af.equivalence_set(examples, per_problem=3, seed=2)
    assert af.equivalence_set(examples, per_problem=3, seed=2, attack_fraction=0.0) == plain
    mixed = af.equivalence_set(examples, per_problem=3, seed=2, attack_fraction=0.25)
    attacks = [it for it in mixed if it.form in af.ATTACKS]
    assert 0.18 < len(attacks) / len(mixed) < 0.32
    assert {it.form for it in attacks} == set(af.ATTACKS)
    for it in mixed:  # every target ends in its label's verdict, attacks included
        for target in (af.classic_target(it), af.cot_target(it)):
            v = judge.parse_verdict(target)
            assert v.status == "ok" and v.correct == it.label, target
    with pytest.raises(ValueError, match="attack_fraction"):
        af.equivalence_set(examples, per_problem=1, seed=0, attack_fraction=1.5)
