"""Scores every row of the shared math prompt sets with its own gold answer, wrapped the way a
model writes it, and with a perturbed answer; prints the rates.

  python -m experiments.check_math_reward [--data_dir=../shared/data]

Expected: 100% of parseable rows score 1 in every wrapping, ~0% of perturbed answers score 1.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from k15jax.rewards import math as math_reward


def wrappings(answer: str, source: str) -> dict[str, str]:
    """Returns {kind: a response ending in `answer` the way a model writes it}."""
    out = {
        "boxed": f"Let me work through it.\nSo the result is \\boxed{{{answer}}}.",
        "answer_is": f"We check the cases. The answer is {answer}.",
        "dollars": f"Therefore the final answer is ${answer}$.",
    }
    if source == "gsm8k":
        out["units"] = f"3 per hour for the rest, so \\boxed{{{answer} \\text{{ dollars}}}}"
        out["last_number"] = f"first 12, then 5, and in total {answer}"
    return out


def perturb(answer: str, source: str) -> str:
    """Returns an answer that must not be equivalent to `answer`."""
    return str(int(answer) + 1) if source == "gsm8k" else answer + "+1"


_DATA_DIR = flags.DEFINE_string("data_dir", "../shared/data", "Directory of the JSONL files.")


def main(argv):
    del argv
    for name in ("gsm8k_train.jsonl", "math_train.jsonl"):
        t0 = time.perf_counter()
        with open(os.path.join(_DATA_DIR.value, name)) as f:
            rows = [json.loads(line) for line in f]
        parsed, gold_ok, wrong_ok, fails = 0, {}, 0, []
        for row in rows:
            answer = row["answer"]
            if not math_reward.parse_answer(answer):
                continue
            parsed += 1
            for kind, response in wrappings(answer, row["source"]).items():
                score = math_reward.reward(row["prompt"], response, answer)[0]
                gold_ok[kind] = gold_ok.get(kind, 0) + score
                if not score:
                    fails.append((row["id"], kind))
            wrong = f"\\boxed{{{perturb(answer, row['source'])}}}"
            wrong_ok += math_reward.reward(row["prompt"], wrong, answer)[0]
        rates = ", ".join(f"{k} {v / parsed:.2%}" for k, v in gold_ok.items())
        print(
            f"{name}: {len(rows)} rows, parseable {parsed} ({parsed / len(rows):.2%}); "
            f"gold scores 1: {rates}; perturbed scores 1: {wrong_ok / parsed:.2%}; "
            f"{time.perf_counter() - t0:.0f}s; first failures {fails[:5]}"
        )


if __name__ == "__main__":
    app.run(main)
