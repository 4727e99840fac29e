"""Final answers written in many forms, an exact reader for them, and an equivalence set.

The built-in task's checker reads "answer: <digits>" only; a judge model (k1.5 §2.3.3,
`rewards.judge`) should also accept `twelve`, `12.0`, `3*4` or `24/2` for 12 and refuse `13`,
`21` or `1 2`. This module gives the ground truth to train and measure such judges with:

- `render(value, form, rng)` writes an integer in one of `EQUAL_FORMS` (same value) or
  `UNEQUAL_FORMS` (a near miss: another value, or no single value at all);
- `parse(text)` reads exactly the forms this module writes and nothing else (an integer, a
  decimal, English number words up to 99, or one binary operation `a op b` with op in + - * /),
  never evaluating the text as code; `reward` is the built-in task's checker over those forms;
- `equivalence_set(examples, ...)` makes (problem, reference, response, label) items from
  task examples, and `classic_target` / `cot_target` are what the two kinds of judge learn to
  write: the verdict at once, or a short normalisation of both answers before the verdict.
"""

from __future__ import annotations

import dataclasses
import random
import re
from fractions import Fraction

from k15jax import tasks

EQUAL_FORMS = ("digits", "decimal", "words", "product", "quotient", "sum", "difference")
UNEQUAL_FORMS = ("off_by_one", "swapped", "spaced", "wrong_words", "wrong_product", "wrong_decimal")
FORMS = EQUAL_FORMS + UNEQUAL_FORMS

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_ANSWER_LINE = re.compile(r"answer:[ \t]*([^\n]*)\s*\Z")
_INT = re.compile(r"-?\d{1,6}")
_DEC = re.compile(r"-?\d{1,6}\.\d{1,6}")
_BINARY = re.compile(r"(-?\d{1,6})\s*([-+*/])\s*(\d{1,6})")


def words(n: int) -> str:
    """Returns `n` (-99..99) in English words: 34 -> "thirty-four", -5 -> "minus five"."""
    if not -99 <= n <= 99:
        raise ValueError(f"{n} is outside -99..99")
    if n < 0:
        return "minus " + words(-n)
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + (f"-{_ONES[ones]}" if ones else "")


_WORD_VALUES = {words(n): n for n in range(-99, 100)}


def parse(text: str) -> Fraction | None:
    """Returns the value of an answer written in one of this module's forms, or None.

    Reads, after stripping whitespace and one trailing period: an integer, a decimal, number
    words (`words`), or `a op b` (integers, op one of + - * /; division by zero is None).
    Anything else, such as "1 2" or "12 or 13", has no single value: None.
    """
    s = text.strip().removesuffix(".").strip()
    if _INT.fullmatch(s):
        return Fraction(int(s))
    if _DEC.fullmatch(s):
        return Fraction(s)
    if s.lower() in _WORD_VALUES:
        return Fraction(_WORD_VALUES[s.lower()])
    m = _BINARY.fullmatch(s)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    if op == "/":
        return Fraction(a, b) if b else None
    return Fraction({"+": a + b, "-": a - b, "*": a * b}[op])


def final_answer(response: str) -> str | None:
    """Returns the text after the last "answer:" when it is on the response's last line."""
    m = _ANSWER_LINE.search(response)
    return m.group(1).strip() if m else None


def reward(prompt: str, response: str, answer: str) -> tuple[float, dict]:
    """Returns (1.0 if the last line's "answer: <form>" has the value `answer`, else 0.0; info).

    The exact checker of the built-in task with answers in any of `EQUAL_FORMS`.
    """
    del prompt
    text = final_answer(response)
    value = None if text is None else parse(text)
    ok = value is not None and value == parse(answer)
    return float(ok), {"extracted": text, "reason": "correct" if ok else "wrong or missing"}


def _factor_pairs(value: int) -> list[tuple[int, int]]:
    return [(a, value // a) for a in range(2, 10) if value % a == 0 and 2 <= value // a <= 99]


def render(value: int, form: str, rng: random.Random) -> str:
    """Returns `value` written in `form`; an `UNEQUAL_FORMS` form writes something else.

    Forms that `value` cannot take (a product of a prime) fall back to another of their kind.
    """
    if form == "digits":
        return str(value)
    if form == "decimal":
        return f"{value}.0"
    if form == "words":
        return words(value)
    if form == "product":
        pairs = _factor_pairs(value)
        if not pairs:
            return render(value, "sum", rng)
        a, b = rng.choice(pairs)
        return f"{a}*{b}"
    if form == "quotient":
        b = rng.randint(2, 4)
        return f"{value * b}/{b}"
    if form == "sum":
        a = rng.randint(1, max(1, value - 1))
        return f"{a}+{value - a}"
    if form == "difference":
        b = rng.randint(1, 9)
        return f"{value + b}-{b}"
    if form == "off_by_one":
        return str(value + rng.choice([-1, 1]))
    if form == "swapped":
        s = str(value)
        if len(s) < 2 or s[0] == s[1]:
            return str(value + rng.choice([-2, 2, 10]))
        return s[::-1]
    if form == "spaced":
        s = str(value)
        return " ".join(s) if len(s) > 1 else f"{s} {rng.randint(1, 9)}"
    if form == "wrong_words":
        return words(value + rng.choice([-1, 1, 10]))
    if form == "wrong_product":
        other = [
            (a, b) for a in range(2, 10) for b in range(2, 10) if a * b in (value - 1, value + 1)
        ]
        if not other:
            return render(value, "off_by_one", rng)
        a, b = rng.choice(other)
        return f"{a}*{b}"
    if form == "wrong_decimal":
        return f"{value}.5"
    raise ValueError(f"form={form!r} must be one of {FORMS}")


def with_answer(trace: str, text: str) -> str:
    """Returns `trace` with its final "answer: ..." line written as `text`."""
    head, sep, _ = trace.rpartition("answer:")
    if not sep:
        raise ValueError(f"trace has no 'answer:' line: {trace[-40:]!r}")
    return f"{head}answer: {text}"


@dataclasses.dataclass(frozen=True)
class Item:
    """One answer-equivalence question and its truth."""

    problem: str
    reference: str
    response: str
    answer: str  # the response's final answer as written
    form: str
    label: bool  # the answer's value equals the reference


def equivalence_set(
    examples: list[tasks.Example], *, per_problem: int, seed: int, equal_fraction: float = 0.5
) -> list[Item]:
    """Returns `per_problem` items for each example: its long trace ending in a drawn form.

    A form is equal with probability `equal_fraction`, then uniform over its kind; the label is
    computed by `parse`, not assumed from the form's kind.
    """
    rng = random.Random(f"equivalence:{seed}")
    out = []
    for e in examples:
        value = int(e.answer)
        for _ in range(per_problem):
            kind = EQUAL_FORMS if rng.random() < equal_fraction else UNEQUAL_FORMS
            form = rng.choice(kind)
            text = render(value, form, rng)
            label = parse(text) == value
            out.append(Item(e.prompt, e.answer, with_answer(e.long_trace, text), text, form, label))
    return out


def _verdict(label: bool) -> str:
    return '{"correct": ' + ("true" if label else "false") + "}"


def classic_target(item: Item) -> str:
    """Returns what a classic judge writes: the verdict at once."""
    return _verdict(item.label)


def cot_target(item: Item) -> str:
    """Returns what a chain-of-thought judge writes: both answers normalised, then the verdict.

    "twelve = 12; reference 12; same" / "1 2 = none; reference 12; differ".
    """
    value = parse(item.answer)
    if value is None:
        norm = "none"
    elif value.denominator == 1:
        norm = str(value.numerator)
    else:
        norm = f"{float(value):g}"
    same = "same" if item.label else "differ"
    return f"{item.answer} = {norm}; reference {item.reference}; {same}\n{_verdict(item.label)}"
