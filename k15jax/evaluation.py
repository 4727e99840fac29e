"""Held-out evaluation: pass@1 (mean correctness over samples) with a 95% interval."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from k15jax import data, rollout, scoring


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    problems: int = 256
    samples: int = 4
    temperature: float = 1.0

    def __post_init__(self):
        if self.problems < 1 or self.samples < 1:
            raise ValueError(f"need problems={self.problems} >= 1 and samples={self.samples} >= 1")


def evaluate(
    engine: rollout.RolloutEngine,
    problems: Sequence[data.Problem],
    prompts: Sequence[Sequence[int]],
    scorer: scoring.Scorer,
    cfg: EvalConfig,
    *,
    max_tokens: int,
    repeat: rollout.RepeatSpec | None,
    seed: int,
) -> dict:
    """Returns held-out pass@1 with a 95% interval, mean response length and the set's size.

    Correctness is `scorer`'s (one definition for training, evaluation and difficulty).
    """
    spec = rollout.SamplingSpec(
        n=cfg.samples, temperature=cfg.temperature, max_tokens=max_tokens, repeat=repeat
    )
    out = engine.generate(prompts, spec, seeds=[seed * 7919 + i for i in range(len(prompts))])
    per_problem = np.zeros(len(problems))
    lengths = []
    for c in out:
        _, correct, _ = scorer(problems[c.prompt_index], c.token_ids, c.finish_reason)
        per_problem[c.prompt_index] += correct / cfg.samples
        lengths.append(len(c.token_ids))
    mean = float(per_problem.mean())
    # Normal interval over problems (samples of one problem are not independent).
    half = 1.96 * float(per_problem.std(ddof=1)) / np.sqrt(len(problems))
    return {
        "pass_at_1": mean,
        "ci95": [mean - half, mean + half],
        "mean_length": float(np.mean(lengths)),
        "problems": len(problems),
        "samples": cfg.samples,
    }
