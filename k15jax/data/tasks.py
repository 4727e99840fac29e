"""Built-in verifiable tasks with solver-made long and short chain-of-thought traces.

`arithmetic`: add a chain of one-digit numbers ("Q:3+5+2+7\\n"); difficulty = number of terms.
The long trace (the long-CoT warm-up data of k1.5 §0) plans, adds step by step, sometimes slips,
checks each step by subtraction, backtracks and redoes a wrong step, and verifies the total
again before answering; the short trace answers directly. Both come from the solver below, with
slips drawn from the seed, never written by hand.

The held-out split is fixed: a problem belongs to it iff a hash of its text says so, so train and
held-out generators (different seeds) can never produce the same problem.

`columns`: add two numbers of the same number of digits ("Q:4753+3689\\n"); difficulty = digits.
A guess of the whole sum fails (a carry can change every digit above it; measured in BUILD.md),
while the long trace (`column_trace`) takes one column at a time from the right: it restates the
digits still to add, the carry and the digits written so far, adds the column's two digits and
the carry, and checks the sum by subtracting back. A slip fails its check; the solver notices it
and redoes the column another way (the addends swapped). More digits, longer trace.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

PROMPT_PREFIX = "Q:"
_ANSWER = re.compile(r"answer:\s*(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    difficulty: int
    long_trace: str  # response text, ends with "answer: <n>"
    short_trace: str


def is_held_out(prompt: str, fraction: float = 0.1) -> bool:
    """Returns whether `prompt` belongs to the fixed held-out split."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % 10_000 < fraction * 10_000


def long_trace(terms: list[int], rng: random.Random, slip_prob: float) -> str:
    """Returns a solver's long chain of thought over `terms`, with checked and repaired slips.

    Each step restates the terms still to add, so the next one is always close at hand.
    """
    lines = [f"plan: add {len(terms)} numbers, check each"]
    total = terms[0]
    for i, t in enumerate(terms[1:], start=2):
        rest = "+".join(map(str, terms[i:])) or "none"
        right = total + t
        if rng.random() < slip_prob:
            wrong = right + rng.choice([-2, -1, 1, 2])
            lines.append(f"{total}+{t}={wrong}, left {rest}")
            lines.append(f"check {wrong}-{t}={wrong - t} not {total}, wrong")
            lines.append(f"redo {total}+{t}={right}, left {rest}")
        else:
            lines.append(f"{total}+{t}={right}, left {rest}")
        lines.append(f"check {right}-{t}={total} ok")
        total = right
    lines.append(f"answer: {total}")
    return "\n".join(lines)


def column_trace(a: int, b: int, rng: random.Random, slip_prob: float) -> str:
    """Returns the solver's column-by-column addition of `a` and `b` (equal digit counts).

    Each line restates what is left of both numbers, the carry and the digits written so far,
    so every digit a step needs is on its own line or the one above.
    """
    da, db = str(a), str(b)
    d = len(da)
    if len(db) != d:
        raise ValueError(f"{a} and {b} must have the same number of digits")
    lines = [f"plan: {d} columns, carry, check"]
    carry, written = 0, ""
    for j in range(d):
        x, y = int(da[d - 1 - j]), int(db[d - 1 - j])
        s = x + y + carry
        head = f"{da[: d - j]}+{db[: d - j]} c{carry}" + (f" | {written}" if written else "")
        step = f"{x}+{y}+{carry}={s}"
        if rng.random() < slip_prob:
            wrong = s + rng.choice([w for w in (-2, -1, 1, 2) if s + w - y - carry >= 0])
            step = (
                f"{x}+{y}+{carry}={wrong} back {wrong - y - carry} no, "
                f"another way {y}+{x}+{carry}={s}"
            )
        lines.append(f"{head}: {step} back {x} ok")
        carry, written = s // 10, f"{s % 10}{written}"
    total = f"{carry}{written}" if carry else written
    lines.append(f"c{carry} | {total}")
    lines.append(f"answer: {total}")
    return "\n".join(lines)


def make_example(terms: list[int], rng: random.Random, slip_prob: float = 0.15) -> Example:
    prompt = f"{PROMPT_PREFIX}{'+'.join(map(str, terms))}\n"
    answer = str(sum(terms))
    return Example(
        prompt=prompt,
        answer=answer,
        difficulty=len(terms),
        long_trace=long_trace(terms, rng, slip_prob),
        short_trace=f"answer: {answer}",
    )


def make_column_example(a: int, b: int, rng: random.Random, slip_prob: float) -> Example:
    prompt = f"{PROMPT_PREFIX}{a}+{b}\n"
    answer = str(a + b)
    return Example(
        prompt=prompt,
        answer=answer,
        difficulty=len(str(a)),
        long_trace=column_trace(a, b, rng, slip_prob),
        short_trace=f"answer: {answer}",
    )


FAMILIES = ("sums", "columns")  # `generate(family=...)`: the docstring above says what each is


def generate(
    n: int,
    *,
    seed: int,
    split: str = "train",
    min_terms: int = 2,
    max_terms: int = 6,
    slip_prob: float = 0.15,
    unique: bool = True,
    max_term: int = 9,
    family: str = "sums",
    min_digits: int = 2,
    max_digits: int = 4,
) -> list[Example]:
    """Returns `n` problems of `split` ("train" or "held_out"), deterministic per seed.

    Difficulty is uniform in [min_terms, max_terms] (number of terms, family "sums") or in
    [min_digits, max_digits] (digits of both numbers, family "columns"). With `unique=False`
    a problem may repeat (with its own trace and slips), as warm-up data may.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r} must be 'train' or 'held_out'")
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} must be one of {FAMILIES}")
    if family == "columns":
        return _generate_columns(n, seed, split, min_digits, max_digits, slip_prob, unique)
    if not 1 <= max_term <= 9:
        raise ValueError(f"max_term={max_term} must be a digit 1..9")
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms={min_terms} <= max_terms={max_terms}")
    rng = random.Random(f"{split}:{seed}")

    def propose():
        terms = [rng.randint(1, max_term) for _ in range(rng.randint(min_terms, max_terms))]
        prompt = f"{PROMPT_PREFIX}{'+'.join(map(str, terms))}\n"
        return prompt, lambda: make_example(terms, rng, slip_prob)

    return _draw(n, split, unique, propose, what=f"{max_terms=}")


def _generate_columns(
    n: int, seed: int, split: str, min_digits: int, max_digits: int, slip_prob: float, unique: bool
) -> list[Example]:
    if not 1 <= min_digits <= max_digits <= 9:
        raise ValueError(f"need 1 <= min_digits={min_digits} <= max_digits={max_digits} <= 9")
    rng = random.Random(f"columns:{split}:{seed}")

    def propose():
        d = rng.randint(min_digits, max_digits)
        a, b = rng.randint(10 ** (d - 1), 10**d - 1), rng.randint(10 ** (d - 1), 10**d - 1)
        return f"{PROMPT_PREFIX}{a}+{b}\n", lambda: make_column_example(a, b, rng, slip_prob)

    return _draw(n, split, unique, propose, what=f"{max_digits=}")


def _draw(n: int, split: str, unique: bool, propose, *, what: str) -> list[Example]:
    """Returns the first `n` proposals of `split` (distinct unless `unique=False`).

    `propose()` returns (prompt, build); `build()` makes the example and runs only for a kept
    prompt, so a family's random draws are the same whatever the split filter rejects.
    """
    want_held_out = split == "held_out"
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"cannot find {n} distinct {split} problems with {what}")
        prompt, build = propose()
        if (unique and prompt in seen) or is_held_out(prompt) != want_held_out:
            continue
        seen.add(prompt)
        out.append(build())
    return out


def extract(response: str) -> str | None:
    """Returns the last "answer: <n>" number of a response, or None."""
    found = _ANSWER.findall(response)
    return found[-1] if found else None


def reward(prompt: str, response: str, answer: str) -> tuple[float, dict]:
    """Returns (1.0 if the response's final "answer: n" equals `answer`, else 0.0; info)."""
    del prompt
    got = extract(response)
    ok = got is not None and int(got) == int(answer)
    return float(ok), {"extracted": got, "reason": "correct" if ok else "wrong or missing"}
