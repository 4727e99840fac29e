"""Scores every row of the shared math prompt sets with its own gold answer, wrapped the way a
model writes it, with a perturbed answer in the same wrappings, and with attacks that hold the
gold answer but must not earn reward; prints the rates.

  python -m experiments.checks.check_math_reward [--data_dir=../shared/data]

Expected: 100% of parseable rows score 1 in every wrapping, 0% (up to a handful of rows whose
perturbed answer is still equal, e.g. `\\infty+1`) of perturbed answers score 1, and 0% of
attacks score 1.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from k15jax.rewards import math as math_reward

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    """Returns `n` (|n| < 10**9) in English words: 1205 -> "one thousand two hundred five"."""
    if n < 0:
        return "negative " + spell(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = spell(n % size) if n % size else ""
            return f"{spell(n // size)} {name} {rest}".strip()
    raise AssertionError(n)


def wrappings(answer: str, source: str) -> dict[str, str]:
    """Returns {kind: a response ending in `answer` the way a model writes it}."""
    out = {
        "boxed": f"Let me work through it.\nSo the result is \\boxed{{{answer}}}.",
        "answer_is": f"We check the cases. The answer is {answer}.",
        "dollars": f"Therefore the final answer is ${answer}$.",
        "last_latex": f"Putting the pieces together, the value is ${answer}$.",
    }
    if source == "gsm8k":
        n = int(answer)
        out["units"] = f"3 per hour for the rest, so \\boxed{{{answer} \\text{{ dollars}}}}"
        out["last_number"] = f"first 12, then 5, and in total {answer}"
        out["words"] = f"First 12, then 5. In total she has {spell(n)} apples."
        out["thin_space"] = f"So \\boxed{{{f'{n:,}'.replace(',', chr(0x2009))}}}"
        out["latex_thousands"] = f"So $x = {f'{n:,}'.replace(',', '{,}')}$"
        out["escaped_dollar"] = f"So she pays \\${answer}.00 in total."
        out["unicode_minus"] = f"\\boxed{{{answer.replace('-', chr(0x2212))}}}"
    return out


def attacks(answer: str, source: str) -> dict[str, str]:
    """Returns {kind: a response that holds `answer` but does not commit to it alone}."""
    wrong = perturb(answer, source)
    filler = "Let me reconsider every step of the argument once more, carefully. " * 60
    out = {
        "two_boxes": f"Maybe \\boxed{{{wrong}}}, or maybe \\boxed{{{answer}}}.",
        "hedge_or": f"It is either ${wrong}$ or ${answer}$.",
        "early_then_long": f"A guess: {answer}.\n{filler}\nI am not sure.",
        "nested_box": f"\\boxed{{{wrong} \\boxed{{{answer}}}}}",
    }
    if source == "gsm8k":
        n = int(answer)
        out["listing"] = "The answer is " + ", ".join(map(str, range(n - 5, n + 6))) + "."
        out["words_or"] = f"She has {spell(n + 1)} or {spell(n)} apples."
        out["inequality"] = f"\\boxed{{x \\ge {answer}}}"
    return out


def perturb(answer: str, source: str) -> str:
    """Returns an answer that must not be equivalent to `answer`."""
    return str(int(answer) + 1) if source == "gsm8k" else answer + "+1"


_DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data", "Directory of the JSONL files.")


def _rates(counts: dict[str, float], n: int) -> str:
    return ", ".join(f"{k} {v / n:.2%}" for k, v in counts.items())


def main(argv):
    del argv
    for name in ("gsm8k_train.jsonl", "math_train.jsonl"):
        t0 = time.perf_counter()
        with open(os.path.join(_DATA_DIR.value, name)) as f:
            rows = [json.loads(line) for line in f]
        parsed, gold_ok, wrong_ok, attack_ok, fails = 0, {}, {}, {}, []
        for row in rows:
            answer, source = row["answer"], row["source"]
            if not math_reward.parse_answer(answer):
                continue
            parsed += 1
            wrong = wrappings(perturb(answer, source), source)
            for kind, response in wrappings(answer, source).items():
                score = math_reward.reward(row["prompt"], response, answer)[0]
                gold_ok[kind] = gold_ok.get(kind, 0) + score
                if not score:
                    fails.append((row["id"], kind))
                score = math_reward.reward(row["prompt"], wrong[kind], answer)[0]
                wrong_ok[kind] = wrong_ok.get(kind, 0) + score
            for kind, response in attacks(answer, source).items():
                score = math_reward.reward(row["prompt"], response, answer)[0]
                attack_ok[kind] = attack_ok.get(kind, 0) + score
        print(
            f"{name}: {len(rows)} rows, parseable {parsed} ({parsed / len(rows):.2%}); "
            f"{time.perf_counter() - t0:.0f}s\n"
            f"  gold scores 1: {_rates(gold_ok, parsed)}\n"
            f"  perturbed scores 1: {_rates(wrong_ok, parsed)}\n"
            f"  attacks score 1: {_rates(attack_ok, parsed)}\n"
            f"  first failures {fails[:5]}"
        )


if __name__ == "__main__":
    app.run(main)
