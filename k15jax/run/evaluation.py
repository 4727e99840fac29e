"""Held-out evaluation: pass@k, avg@k and maj@k over problems, each with a 95% interval.

With n samples of a problem, c of them correct (`scoring.Scorer`'s one definition):

- pass@k: the chance that at least one of k samples is correct, estimated without bias by
  1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", the Codex paper), computed as a product so n = 1024 is exact to float precision;
- avg@k: mean correctness over k samples; its expectation is the per-sample accuracy for every
  k, so the estimate from n >= k samples is c / n (papers that report avg@16 draw n = 16);
- maj@k: whether the most frequent final answer of k samples is correct (`maj_at_k`).

Intervals are normal intervals over problems (the samples of one problem are not independent):
mean +- 1.96 * std(ddof=1) / sqrt(problems); NaN for a single problem.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from k15jax.data import prompt_sets
from k15jax.rewards import scoring
from k15jax.rollout import engines

AnswerFn = Callable[
    [prompt_sets.Problem, str], str | None
]  # (problem, response text) -> final answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    problems: int = 256
    samples: int = 4
    temperature: float = 1.0
    ks: tuple[int, ...] = (1,)  # pass@k / avg@k / maj@k for each k (each <= samples)

    def __post_init__(self):
        if self.problems < 1 or self.samples < 1:
            raise ValueError(f"need problems={self.problems} >= 1 and samples={self.samples} >= 1")
        if not self.ks or any(not 1 <= k <= self.samples for k in self.ks):
            raise ValueError(f"ks={self.ks} must be non-empty, each in [1, samples={self.samples}]")


def _check_counts(n: int, c: int, k: int) -> None:
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name}={v!r} must be an integer")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Returns the unbiased pass@k estimate 1 - C(n-c, k) / C(n, k) of n samples, c correct.

    C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k/i): no factorials, no overflow.

    Raises:
      ValueError: unless 0 <= c <= n and 1 <= k <= n (integers), naming the values.
    """
    _check_counts(n, c, k)
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(n: int, c: int, k: int) -> float:
    """Returns the avg@k estimate c / n (mean correctness over k samples; module docstring)."""
    _check_counts(n, c, k)
    return c / n


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Returns maj@k of one problem: majority-vote correctness, averaged over blocks of k samples.

    The samples are cut into the floor(n/k) consecutive blocks of k (a remainder is left out);
    samples are drawn independently, so each block is a fresh draw of k and the mean is an
    unbiased estimate of maj@k. In a block, every sample with an answer (not None) votes for
    it; an answer counts as correct when a sample that gave it is correct. The block scores the
    fraction of correct answers among those tied for the most votes (the expected result of
    breaking the tie at random: two tied answers, one correct, score 0.5). A block in which
    no sample answers scores 0.

    Raises:
      ValueError: for answers and correct of different lengths, or k outside [1, n].
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"answers ({n}) and correct ({len(correct)}) differ in length")
    _check_counts(n, 0, k)
    scores = []
    for start in range(0, n - k + 1, k):
        votes = collections.Counter()
        right = set()
        for answer, ok in zip(answers[start : start + k], correct[start : start + k], strict=True):
            if answer is not None:
                votes[answer] += 1
                if ok:
                    right.add(answer)
        if not votes:
            scores.append(0.0)
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        scores.append(sum(a in right for a in tied) / len(tied))
    return float(np.mean(scores))


def mean_ci95(values: Sequence[float]) -> tuple[float, list[float]]:
    """Returns (mean, [low, high]): the normal 95% interval of the mean over problems."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, [math.nan, math.nan]
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, [mean - half, mean + half]


def paired_gain(before: dict, after: dict) -> tuple[float, list[float]]:
    """Returns (mean, 95% interval) of after - before pass@1 over the same problems.

    Both are `evaluate` results on one held-out set (the same problems in the same order):
    the interval is over each problem's difference, so problem difficulty, which both models
    share, drops out of it (narrower than the two separate intervals).
    """
    a, b = np.asarray(before["correct"], float), np.asarray(after["correct"], float)
    if a.shape != b.shape:
        raise ValueError(f"not the same problems: {a.shape} and {b.shape} correct counts")
    return mean_ci95(b / after["samples"] - a / before["samples"])


def evaluate(
    engine: engines.RolloutEngine,
    problems: Sequence[prompt_sets.Problem],
    prompts: Sequence[Sequence[int]],
    scorer: scoring.Scorer,
    cfg: EvalConfig,
    *,
    max_tokens: int,
    repeat: engines.RepeatSpec | None,
    seed: int,
    answer_of: AnswerFn | None = None,
) -> dict:
    """Returns pass@1 with a 95% interval, pass@k / avg@k (/ maj@k) for `cfg.ks`, mean length.

    Keys: "pass_at_1", "ci95" (its interval), "mean_length", "problems", "samples", "correct"
    (correct samples per problem), and "at_k": {"pass@k" | "avg@k" | "maj@k": {"mean", "ci95"}}.
    Correctness is `scorer`'s (one definition for training, evaluation and difficulty).

    maj@k votes with the final answer of each sample that stopped by itself ("stop"; a cut or
    repeating sample abstains): `answer_of(problem, text)` when given, else the reward's
    `info["extracted"]` (the math and built-in task rewards report it). Without either (the
    code reward), maj@k is left out.
    """
    spec = engines.SamplingSpec(
        n=cfg.samples, temperature=cfg.temperature, max_tokens=max_tokens, repeat=repeat
    )
    out = engine.generate(prompts, spec, seeds=[seed * 7919 + i for i in range(len(prompts))])
    correct = [[] for _ in problems]
    answers = [[] for _ in problems]
    has_answers = True
    lengths = []
    for c in out:
        problem = problems[c.prompt_index]
        _, ok, info = scorer(problem, c.token_ids, c.finish_reason)
        correct[c.prompt_index].append(bool(ok))
        answer = None
        if c.finish_reason == "stop":
            if answer_of is not None:
                answer = answer_of(problem, scorer.decode(c.token_ids))
            elif "extracted" in info:
                answer = info["extracted"]
            else:
                has_answers = False
        answers[c.prompt_index].append(None if answer is None else str(answer))
        lengths.append(len(c.token_ids))
    counts = [sum(ok) for ok in correct]
    at_k = {}
    for k in cfg.ks:
        for name, fn in (("pass", pass_at_k), ("avg", avg_at_k)):
            mean, ci = mean_ci95([fn(cfg.samples, c, k) for c in counts])
            at_k[f"{name}@{k}"] = {"mean": mean, "ci95": ci}
        if has_answers:
            mean, ci = mean_ci95(
                [maj_at_k(a, ok, k) for a, ok in zip(answers, correct, strict=True)]
            )
            at_k[f"maj@{k}"] = {"mean": mean, "ci95": ci}
    mean, ci = mean_ci95([c / cfg.samples for c in counts])
    return {
        "pass_at_1": mean,
        "ci95": ci,
        "mean_length": float(np.mean(lengths)),
        "problems": len(problems),
        "samples": cfg.samples,
        "correct": counts,
        "at_k": at_k,
    }


def markdown_table(name: str, result: dict) -> str:
    """Returns a markdown table of `evaluate`'s result: one row per k, metrics with intervals."""
    metrics = [m for m in ("pass", "avg", "maj") if any(k.startswith(m) for k in result["at_k"])]
    ks = sorted({int(key.split("@")[1]) for key in result["at_k"]})
    lines = [
        f"### {name}: {result['problems']} problems x {result['samples']} samples, "
        f"mean length {result['mean_length']:.1f}",
        "",
        "| k | " + " | ".join(f"{m}@k [95% interval]" for m in metrics) + " |",
        "|---:|" + "---|" * len(metrics),
    ]
    for k in ks:
        cells = []
        for m in metrics:
            v = result["at_k"][f"{m}@{k}"]
            lo, hi = v["ci95"]
            cells.append(f"{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
