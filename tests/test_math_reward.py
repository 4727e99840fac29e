"""Math reward: real GSM8K / MATH answers in model-like wrappings, each answer form the rules
know, and the responses a reward-seeking policy could try (each must score 0).

The data test takes a seeded sample of each file; the full-file rates come from
`python -m experiments.checks.check_math_reward`. Every other response here is written by hand.
"""

import json
import os
import random
import time

import pytest

from experiments.checks.check_math_reward import attacks, perturb, spell, wrappings
from k15jax.rewards import math as math_reward

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
SAMPLE = 150


def _rows(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    random.Random(0).shuffle(rows)
    return rows[:SAMPLE]


def _score(response, answer, prompt=""):
    return math_reward.reward(prompt, response, answer)[0]


@pytest.mark.parametrize("name", ["gsm8k_train.jsonl", "math_train.jsonl"])
def test_gold_scores_one_perturbed_and_attacks_zero(name):
    parsed = 0
    for row in _rows(name):
        answer, source = row["answer"], row["source"]
        if not math_reward.parse_answer(answer):
            continue
        parsed += 1
        wrong = wrappings(perturb(answer, source), source)
        for kind, response in wrappings(answer, source).items():
            score, info = math_reward.reward(row["prompt"], response, answer)
            assert score == 1.0, (row["id"], kind, info)
            assert _score(wrong[kind], answer, row["prompt"]) == 0.0, (row["id"], kind)
        for kind, response in attacks(answer, source).items():
            score, info = math_reward.reward(row["prompt"], response, answer)
            assert score == 0.0, (row["id"], kind, info)
    assert parsed >= 0.95 * SAMPLE


def test_spell_writes_english_numbers():
    # The experiment's own speller, checked by hand: the words tests rely on it.
    assert spell(7) == "seven"
    assert spell(21) == "twenty-one"
    assert spell(-47) == "negative forty-seven"
    assert spell(1205) == "one thousand two hundred five"
    assert spell(192_000_000) == "one hundred ninety-two million"


@pytest.mark.parametrize(
    "response, want, how",
    [
        ("The answer is 42.", "42", "answer_is"),
        ("the answer: $\\frac{3}{4}$ and done", "\\frac{3}{4}", "answer_is"),
        ("so the diagonal is $\\sqrt{117}$", "\\sqrt{117}", "last_expression"),
        ("which gives $4\\frac{2}{3}$ cups", "4\\frac{2}{3}", "last_expression"),
        ("in polar form that is $(3, \\pi/2)$.", "(3, \\pi/2)", "last_expression"),
        ("we get 1,200 apples and then 7", "7", "last_expression"),
        ("She ends up with nineteen marbles.", "19", "number_words"),
        ("no digits here", None, "none"),
    ],
)
def test_extraction(response, want, how):
    assert math_reward.extract_answer(response) == (want, how)


@pytest.mark.parametrize(
    "response, boxes, refused",
    [
        ("so \\boxed{\\frac{1}{2}} and \\boxed{3}", ["\\frac{1}{2}", "3"], None),
        ("\\boxed{x^{2}+\\frac{1}{2}}", ["x^{2}+\\frac{1}{2}"], None),
        ("\\fbox{ 5 }", ["5"], None),
        ("\\boxed{\\boxed{7}}", ["7"], None),
        ("\\boxed{}", [""], None),
        ("\\boxed{2 \\boxed{7}}", [], "nested boxes with other content"),
        ("\\boxed{4} and \\boxed{5", ["4"], "unclosed box"),
    ],
)
def test_boxed_answers(response, boxes, refused):
    assert math_reward.boxed_answers(response) == (boxes, refused)


def test_equivalent_forms_and_no_answer():
    assert _score("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert _score("\\boxed{(a+2)(a-2)}", "a^2-4") == 1.0
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
        assert _score(response, gold) == 1.0, response


# (response, reference, the same response with another final value): no box, no "answer is".
LAST_EXPRESSION = [
    (
        "Using Pythagoras, the length is $\\sqrt{117}$",
        "\\sqrt{117}",
        "Using Pythagoras, the length is $\\sqrt{118}$",
    ),
    (
        "Using Pythagoras, the length is $\\sqrt{117}$",
        "3\\sqrt{13}",
        "Using Pythagoras, the length is $\\sqrt{17}$",
    ),
    (
        "Altogether she needs $4\\frac{2}{3}$",
        "\\frac{14}{3}",
        "Altogether she needs $4\\frac{1}{3}$",
    ),
    (
        "In polar coordinates the point is $(3, \\pi/2)$.",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "In polar coordinates the point is $(3, \\pi/4)$.",
    ),
    (
        "Thus the slope is \\(-\\frac{5}{2}\\).",
        "-\\frac52",
        "Thus the slope is \\(\\frac{5}{2}\\).",
    ),
    (
        "Adding them up,\n$$\nx = 2^{10} = 1024\n$$",
        "1024",
        "Adding them up,\n$$\nx = 1024 = 2^{9}\n$$",
    ),
    ("first 12, then 5, and in total 3", "3", "first 12, then 5, and in total 3 and 4"),
    (
        "The locus is $\\text{three points}$.",
        "\\text{three points}",
        "The locus is $\\text{four points}$.",
    ),
    # math-verify's text of this match does not parse again the same way; its parse is used
    (
        "The sides are $3, 4\\text{, and }5$.",
        "3, 4\\text{, and }5",
        "The sides are $3, 4\\text{, and }6$.",
    ),
]


@pytest.mark.parametrize("response, answer, wrong", LAST_EXPRESSION)
def test_last_expression(response, answer, wrong):
    assert _score(response, answer) == 1.0
    assert _score(wrong, answer) == 0.0


# (response, reference, prompt) pairs that are equal in a form math-verify alone does not know.
FORMS = [
    # escaped dollar amounts, either side
    ("So Maya pays \\boxed{\\$18}.", "18", ""),
    ("The total is \\\\$18.00 after tax.", "18", ""),
    ("The answer is 18 dollars.", "\\$18", ""),
    ("\\boxed{\\$1,\\!250.50}", "1250.5", ""),
    # an inequality for an interval, either side
    ("Hence \\boxed{x > 3}", "(3, \\infty)", ""),
    ("Hence \\boxed{(3, \\infty)}", "x > 3", ""),
    ("so \\boxed{-2 \\le x < 5}", "[-2, 5)", ""),
    ("so \\boxed{x \\le -1 \\text{ or } x \\geq 4}", "(-\\infty, -1] \\cup [4, \\infty)", ""),
    ("so \\boxed{1 < x < 6}", "(1, 6)", "Give your answer in interval notation."),
    # numbers in words
    ("The answer is twelve.", "12", ""),
    ("\\boxed{\\text{twenty-one}}", "21", ""),
    ("So they planted one hundred trees.", "100", ""),
    ("The answer is one hundred and five.", "105", ""),
    ("\\boxed{three thousand four hundred}", "3400", ""),
    ("The answer is minus seven.", "-7", ""),
    ("\\boxed{9}", "\\mbox{nine}", ""),
    # thousands separators
    ("\\boxed{70\\,000}", "70000", ""),
    ("\\boxed{70{,}000}", "70000", ""),
    ("\\boxed{70\u2009000}", "70000", ""),
    ("\\boxed{70\u202f000}", "70000", ""),
    ("The population is 1\u202f250\u202f000.", "1250000", ""),
    ("\\boxed{70000}", "70,\\!000", ""),
    ("\\boxed{3.141\\,592}", "3.141592", ""),
    # a Unicode minus and an en dash as minus
    ("\\boxed{\u221217}", "-17", ""),
    ("The answer is \u201317.", "-17", ""),
    ("So the temperature drops to \u20134 degrees.", "-4", ""),
    ("\\boxed{(\u20132, 3)}", "(-2, 3)", ""),
    # words as text, wrappers
    ("\\boxed{even}", "\\text{even}", ""),
    ("\\boxed{\\textbf{Sunday}}", "\\text{Sunday}", ""),
    ("\\boxed{\\mathrm{odd}}", "\\text{odd}", ""),
    ("\\boxed{\\textbf{42}}", "42", ""),
    ("\\boxed{(C)}", "\\text{(C)}", ""),
    # degrees and units
    ("\\boxed{75^\\circ}", "75", ""),
    ("\\boxed{75}", "75^{\\circ}", ""),
    ("\\boxed{75\u00b0}", "75^\\circ", ""),
    ("\\boxed{75 \\text{ degrees}}", "75^\\circ", ""),
    ("\\boxed{12 \\text{ cm}^2}", "12", ""),
    # a period inside braces does not end an "answer is" sentence; a newline inside \text{}
    ("The answer is 12\\text{ sq. ft}.", "12\\text{ sq. ft}", ""),
    ("\\boxed{40\\text{ cubic\ninches}}", "40\\text{ cubic\ninches}", ""),
]


@pytest.mark.parametrize("response, answer, prompt", FORMS)
def test_forms_score_one(response, answer, prompt):
    score, info = math_reward.reward(prompt, response, answer)
    assert score == 1.0, info


# Responses that hold the reference somewhere but do not answer with it alone: each must score 0.
MUST_REJECT = [
    # listing many candidates
    ("\\boxed{1, 2, 3, \\ldots, 100}", "37", ""),
    ("The answer is 1, 2, 3, ..., 100.", "37", ""),
    ("It could be any of 35, 36, 37, 38.", "37", ""),
    ("$35$, $36$, $37$, $38$", "37", ""),
    ("\\boxed{\\{35, 36, 37\\}}", "37", ""),
    ("\\boxed{[0, 100]}", "37", ""),
    ("\\boxed{x \\in \\mathbb{R}}", "37", ""),
    ("\\boxed{36.5 \\pm 0.5}", "37", ""),
    # an inequality that merely contains the reference number
    ("\\boxed{x > 37}", "37", ""),
    ("\\boxed{x \\geq 37}", "37", ""),
    ("\\boxed{37 \\le n}", "37", ""),
    ("\\boxed{n \\neq 37}", "37", ""),
    ("\\boxed{x \\ge 3}", "[3, 4]", ""),
    ("\\boxed{x > 3 \\text{ or } x < 100}", "(3, \\infty)", ""),
    # an open pair is also a point: without "interval" in the problem it is not an inequality
    ("\\boxed{1 < x < 6}", "(1, 6)", "Find the intersection point of the two lines."),
    # alternatives joined by "or"
    ("The answer is twelve or thirteen.", "13", ""),
    ("\\boxed{twelve or thirteen}", "13", ""),
    ("\\boxed{12 \\text{ or } 13}", "13", ""),
    ("It is 12 or 13.", "13", ""),
    ("Either $12$ or $13$", "13", ""),
    ("So x = 12 or x = 13.", "13", ""),
    ("She has twelve or thirteen apples.", "13", ""),
    ("12, or \\boxed{13}", "13", ""),
    ("\\boxed{x = 12 \\lor x = 13}", "13", ""),
    # junk between two values: math-verify's plain reading alone takes the last number
    ("\\boxed{12 \\land 13}", "13", ""),
    ("\\boxed{12 | 13}", "13", ""),
    ("\\boxed{12 ( 13}", "13", ""),
    ("The answer is 12 \\to 13.", "13", ""),
    ("Thus we get $12 \\top 13$", "13", ""),
    ("\\boxed{12 = 13}", "13", ""),
    ("\\boxed{x = 12 = 13}", "13", ""),
    # words that are a list, not one number
    ("\\boxed{one two three}", "6", ""),
    ("\\boxed{twelve thirteen}", "1213", ""),
    ("\\boxed{twenty thirty}", "50", ""),
    # the right number early in a long response
    ("My first guess is 37.\n" + "Let me check the algebra again carefully. " * 80, "37", ""),
    ("The answer is 37.\n" + "Now compare with the other method. " * 100, "37", ""),
    # empty, nested and conflicting boxes
    ("\\boxed{}", "0", ""),
    ("\\boxed{ }", "0", ""),
    ("\\boxed{} The answer is 37.", "37", ""),
    ("\\boxed{36 \\boxed{37}}", "37", ""),
    ("\\boxed{\\boxed{36} \\boxed{37}}", "37", ""),
    ("First \\boxed{36}, then \\boxed{37}.", "37", ""),
    ("\\boxed{37}\n...\nso actually \\boxed{38}", "37", ""),
    ("\\boxed{37} and the unfinished \\boxed{3", "37", ""),
    # an en dash between numbers is a range or a difference, never a sign
    ("It takes 7 \u2013 5 hours.", "-5", ""),
    ("\\boxed{7\u20135}", "-5", ""),
    # anagrams of a word answer
    ("\\boxed{neve}", "\\text{even}", ""),
    # too long to be an answer
    ("\\boxed{" + "0+" * 300 + "37}", "37", ""),
]


@pytest.mark.parametrize("response, answer, prompt", MUST_REJECT)
def test_must_reject(response, answer, prompt):
    score, info = math_reward.reward(prompt, response, answer)
    assert score == 0.0, info


@pytest.mark.parametrize(
    "words, value",
    [
        ("seven", 7),
        ("twenty-one", 21),
        ("one hundred", 100),
        ("one hundred and five", 105),
        ("two thousand three hundred forty-five", 2345),
        ("one million two hundred thousand", 1_200_000),
        ("zero", 0),
        ("one two three", None),
        ("twenty thirty", None),
        ("twelve thirteen", None),
        ("thousand", None),
        ("two thousand one million", None),
        ("twenty hundred", None),
        ("one hundred and", None),
        ("seven zero", None),
    ],
)
def test_words_value(words, value):
    assert math_reward._words_value(words.replace("-", " ").split()) == value


def test_normalize_keeps_lists_and_decimals():
    # A comma-and-space list, a decimal comma and a four-digit group are not thousands.
    assert math_reward.normalize("1,\\,234") == "1,\\,234"
    assert math_reward.normalize("3{,}5") == "3{,}5"
    assert math_reward.normalize("12\\,3456") == "12\\,3456"
    assert math_reward.normalize("1\\,234\\,567") == "1234567"
    # Words become numbers only in a text without digits.
    assert math_reward.normalize("one of the 3 boxes", words=True) == "one of the 3 boxes"
    assert math_reward.normalize("one of the boxes", words=True) == "1 of the boxes"


LONG = 100_000
ADVERSARIAL_LONG = {
    "answer_is_dollar": "the answer is $" * (LONG // 15),
    "unclosed_boxes": "\\boxed{" * (LONG // 7),
    "open_braces": "\\boxed{" + "{" * LONG,
    "one_long_number": "7" * LONG,
    "many_same_boxes": "\\boxed{37}" * (LONG // 10),
    "many_boxes": "".join(f"\\boxed{{{i}}}" for i in range(LONG // 10)),
    "long_box": "\\boxed{" + "1+" * (LONG // 2) + "1}",
    "dollar_pairs": "$1$ " * (LONG // 4),
    "en_dashes": "\u20135 " * (LONG // 3),
    "number_words": "twenty one " * (LONG // 11),
    "hedges": "one or " * (LONG // 6),
    "display_math_openers": "\\[" * (LONG // 2),
    "listing": ", ".join(map(str, range(LONG)))[:LONG],
    "prose_then_answer": "x " * (LONG // 2) + "The answer is 37.",
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL_LONG))
def test_long_responses_finish_quickly(kind):
    response = ADVERSARIAL_LONG[kind]
    assert len(response) >= 0.99 * LONG
    t0 = time.perf_counter()
    score, info = math_reward.reward("", response, "37")
    elapsed = time.perf_counter() - t0
    # Each takes < 0.5 s alone; 3 s leaves room for a busy shared machine and stays below
    # math-verify's own 5 s limits, so no case here is saved by its alarm.
    assert elapsed < 3.0, (elapsed, info)
    # The same answer boxed many times is one answer; the rest holds no committed answer.
    assert score == (1.0 if kind in ("prose_then_answer", "many_same_boxes") else 0.0), info


# Binary operators, relations, arrows, separators and spacing that a policy could put between
# two candidates. Left out: arithmetic (`12 + 1` is 13), `\\mod` (`12 \\mod 13` is 12) and
# `\\approx` (math-verify takes its left side: one candidate, not two).
JOINERS = (
    "\\lor \\vee \\land \\wedge \\mid | \\vert \\| \\quad ; \\\\ & \\& \\to \\rightarrow "
    "\\Rightarrow \\implies \\iff \\mapsto \\gets \\sim \\simeq \\cong \\equiv \\propto \\colon : "
    "\\cdots \\ldots ... \\neq < > \\le \\geq \\ll \\cup \\cap \\setminus \\subset \\in \\notin "
    "\\perp \\parallel \\circ \\bullet \\star \\ast \\oplus \\otimes \\, \\; \\! ~ = := "
    "\\therefore \\because \\neg ' ! \\# \\_ ( ) [ ] \\left( \\langle \\lfloor \\vdots \\top "
    "\\bot \\emptyset \\forall \\exists \\backslash"
).split() + ["\\text{ or }", "\\mbox{ or }", "\\operatorname{or}", "\\text{, }", "\\hspace{1em}"]


@pytest.mark.parametrize("joiner", JOINERS)
def test_two_values_joined_score_zero(joiner):
    for first, last in (("12", "13"), ("13", "12")):
        joined = f"{first} {joiner} {last}"
        for response in (
            f"\\boxed{{{joined}}}",
            f"The answer is {joined}.",
            f"So we get ${joined}$",
        ):
            for answer in ("12", "13"):
                score, info = math_reward.reward("", response, answer)
                assert score == 0.0, (response, answer, info)


def test_power_tower_is_bounded_by_the_time_limit():
    # 9^(9^(9^9)) has no finite evaluation; the whole call is cut at its time limit.
    t0 = time.perf_counter()
    score, _ = math_reward.reward("", "\\boxed{9^{9^{9^{9}}}}", "37", timeout_s=1)
    assert score == 0.0
    assert time.perf_counter() - t0 < 4.0
