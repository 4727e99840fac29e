"""The one scoring rule: a completion of a problem -> (reward, correct, info).

Training, evaluation and difficulty estimation all score through `Scorer`, so "correct" means
the same thing everywhere:

  A completion is **correct** iff it ended by itself (finish reason "stop": the model wrote
  its end-of-sequence token) and the task's reward function gives it 1.

- stopped ("stop"): reward = the task reward r (1 or 0; partial credit if the task gives it);
- stopped for repetition ("repeat", the engine's repeat detector): reward = r - repeat_penalty,
  never correct (a model that answers and then loops has not finished its answer);
- cut at the length limit ("truncated" by the partial-rollout budget, "length" by an engine's
  max_tokens): reward = -truncation_penalty, never correct, and the task reward is not asked
  (text cut mid-way may hold an answer-like string it did not commit to).

`score_groups` adds the group length reward of k1.5 §2.3.3 through `rewards.length`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from k15jax import data, partial, tasks
from k15jax.rewards import code as code_reward
from k15jax.rewards import length as length_reward
from k15jax.rewards import math as math_reward

RewardFn = Callable[[str, str, str], tuple[float, dict]]  # (prompt, response, answer)
FINISH_REASONS = ("stop", "repeat", "truncated", "length")


def reward_fn(kind: str, *, sandbox=None) -> RewardFn:
    """Returns the task reward of `kind` (`data.REWARDS`); "code" runs programs in `sandbox`."""
    if kind == "task":
        return tasks.reward
    if kind == "math":
        return math_reward.reward
    if kind == "code":
        if sandbox is None:
            raise ValueError("the code reward needs a sandbox (rewards.sandbox.Sandbox)")
        return functools.partial(code_reward.reward, sandbox=sandbox)
    raise ValueError(f"reward={kind!r} must be one of {data.REWARDS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scorer:
    """The task reward, the tokenizer's decoder and the penalties: everything scoring needs."""

    reward_fn: RewardFn
    decode: Callable[[Sequence[int]], str]
    truncation_penalty: float = 0.5
    repeat_penalty: float = 0.5

    def __call__(
        self, problem: data.Problem, response_ids: Sequence[int], finish_reason: str, *, prefix=""
    ) -> tuple[float, bool, dict]:
        """Returns (reward, correct, info) of a response to `problem` (module docstring).

        `prefix` is prepended to the decoded response (a forced answer start).
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={finish_reason!r} must be one of {FINISH_REASONS}")
        if finish_reason in ("truncated", "length"):
            return -self.truncation_penalty, False, {"reason": "cut at the length limit"}
        r, info = self.reward_fn(problem.prompt, prefix + self.decode(response_ids), problem.answer)
        if finish_reason == "repeat":
            return r - self.repeat_penalty, False, dict(info, reason="stopped for repetition")
        return r, r >= 1.0, info


def score_groups(
    groups: Sequence[partial.Group],
    problems: Sequence[data.Problem],
    scorer: Scorer,
    *,
    iteration: int,
    length: length_reward.LengthPenaltyConfig,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Returns (total reward float32, correct, statistics) of the samples of `groups`, row order.

    total = reward + w(iteration) * length reward within each group; `problems` is what the
    samples' `problem` indices index.
    """
    samples = [s for g in groups for s in g.samples]
    group_size = len(groups[0].samples)
    scored = [scorer(problems[s.problem], s.response_ids, s.finish_reason) for s in samples]
    task_r = np.array([r for r, _, _ in scored])
    correct = np.array([ok for _, ok, _ in scored])
    lengths = np.array([s.length for s in samples])
    w = length_reward.length_weight(
        iteration, weight=length.weight, warmup_iterations=length.warmup_iterations
    )
    total = length_reward.total_reward(task_r, lengths, correct, group_size=group_size, weight=w)
    len_r = length_reward.length_reward(lengths, correct, group_size=group_size)
    reasons = np.array([s.finish_reason for s in samples])
    stats = {
        "accuracy": float(correct.mean()),
        "task_reward": float(task_r.mean()),
        "length_reward": float(np.mean(len_r)),
        "length_weight": w,
        "reward": float(np.mean(total)),
        "response_length": float(lengths.mean()),
        "repeats": float(np.mean(reasons == "repeat")),
        "truncated": float(np.mean(reasons == "truncated")),
    }
    return np.asarray(total, np.float32), correct, stats
