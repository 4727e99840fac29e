"""Built-in verifiable tasks with solver-made long and short chain-of-thought traces.

`arithmetic`: add a chain of one-digit numbers ("Q:3+5+2+7\\n"); difficulty = number of terms.
The long trace (the long-CoT warm-up data of k1.5 §0) plans, adds step by step, sometimes slips,
checks each step by subtraction, backtracks and redoes a wrong step, and verifies the total
again before answering; the short trace answers directly. Both come from the solver below, with
slips drawn from the seed, never written by hand.

The held-out split is fixed: a problem belongs to it iff a hash of its text says so, so train and
held-out generators (different seeds) can never produce the same problem.
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
) -> list[Example]:
    """Returns `n` problems of `split` ("train" or "held_out"), deterministic per seed.

    Difficulty (number of terms) is uniform in [min_terms, max_terms]. With `unique=False`
    a problem may repeat (with its own trace and slips), as warm-up data may.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r} must be 'train' or 'held_out'")
    if not 1 <= max_term <= 9:
        raise ValueError(f"max_term={max_term} must be a digit 1..9")
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms={min_terms} <= max_terms={max_terms}")
    rng = random.Random(f"{split}:{seed}")
    want_held_out = split == "held_out"
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"cannot find {n} distinct {split} problems with {max_terms=}")
        terms = [rng.randint(1, max_term) for _ in range(rng.randint(min_terms, max_terms))]
        prompt = f"{PROMPT_PREFIX}{'+'.join(map(str, terms))}\n"
        if (unique and prompt in seen) or is_held_out(prompt) != want_held_out:
            continue
        seen.add(prompt)
        out.append(make_example(terms, rng, slip_prob))
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
