"""The one scoring rule: a completion of a problem -> (reward, correct, info).

Training, evaluation and difficulty estimation all score through `Scorer`, so "correct" means
the same thing everywhere:

  A completion is **correct** iff it ended by itself (finish reason "stop": the model wrote
  its end-of-sequence token) and the task's reward function gives it 1.

- stopped ("stop"): reward = the task reward r (1 or 0; partial credit if the task gives it);
- stopped for repetition ("repeat", the engine's repeat detector): reward = -repeat_penalty,
  never correct, and the task reward is not asked: the engine ended a degenerate response that
  did not end itself (k1.5 §2.6: repetitions are terminated early and "can be assigned
  additional penalties"), so it earns the 0 of an unfinished answer minus the penalty. Keeping
  r would pay a right answer that then loops 1 - repeat_penalty, above every finished wrong
  answer of its group (a positive advantage for looping);
- cut at the length limit ("truncated" by the partial-rollout budget, "length" by an engine's
  max_tokens): reward = -truncation_penalty, never correct, and the task reward is not asked
  (text cut mid-way may hold an answer-like string it did not commit to).

`score_groups` adds the group length reward of k1.5 §2.3.3 through `rewards.length`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from k15jax.data import answer_forms, prompt_sets, tasks
from k15jax.infra import atomic
from k15jax.rewards import code as code_reward
from k15jax.rewards import judge as judge_lib
from k15jax.rewards import length as length_reward
from k15jax.rewards import math as math_reward
from k15jax.rollout import partial

RewardFn = Callable[[str, str, str], tuple[float, dict]]  # (prompt, response, answer)
FINISH_REASONS = ("stop", "repeat", "truncated", "length")


def reward_fn(kind: str, *, sandbox=None) -> RewardFn:
    """Returns the task reward of `kind` (`data.REWARDS`); "code" runs programs in `sandbox`."""
    if kind == "task":
        return tasks.reward
    if kind == "forms":
        return answer_forms.reward
    if kind == "math":
        return math_reward.reward
    if kind == "code":
        if sandbox is None:
            raise ValueError("the code reward needs a sandbox (rewards.sandbox.Sandbox)")
        return functools.partial(code_reward.reward, sandbox=sandbox)
    raise ValueError(f"reward={kind!r} must be one of {prompt_sets.REWARDS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scorer:
    """The task reward, the tokenizer's decoder and the penalties: everything scoring needs."""

    reward_fn: RewardFn
    decode: Callable[[Sequence[int]], str]
    # The run sets both from its `partial.PartialConfig`, where their defaults live.
    truncation_penalty: float = partial.PartialConfig.truncation_penalty
    repeat_penalty: float = partial.PartialConfig.repeat_penalty

    def __call__(
        self,
        problem: prompt_sets.Problem,
        response_ids: Sequence[int],
        finish_reason: str,
        *,
        prefix="",
    ) -> tuple[float, bool, dict]:
        """Returns (reward, correct, info) of a response to `problem` (module docstring).

        `prefix` is prepended to the decoded response (a forced answer start).
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={finish_reason!r} must be one of {FINISH_REASONS}")
        if finish_reason in ("truncated", "length"):
            return -self.truncation_penalty, False, {"reason": "cut at the length limit"}
        if finish_reason == "repeat":
            return -self.repeat_penalty, False, {"reason": "stopped for repetition"}
        r, info = self.reward_fn(problem.prompt, prefix + self.decode(response_ids), problem.answer)
        return self.finish(r, info)

    def finish(self, r: float, info: dict) -> tuple[float, bool, dict]:
        """Returns (reward, correct, info) of a task reward `r` of a response that ended by
        itself ("stop"): correct iff r >= 1."""
        return r, r >= 1.0, info


GRADERS = ("rules", "judge", "rules_then_judge")


@dataclasses.dataclass(kw_only=True)
class Grader:
    """Training rewards from a judge model (`rewards.judge`, k1.5 §2.3.3) beside the rules.

    `mode` "judge": the judge grades every response that ended by itself ("stop"; a repeating
    or cut one has its penalty, whatever its text); "rules_then_judge": only those the task's
    rules score below 1. The rules are computed for
    every response anyway, so each iteration counts the judge's disagreements with them. An
    unusable verdict falls back to `judge.fallback`. With `log_path`, every judged response is
    appended there as a JSON line with the judge's text.
    """

    judge: judge_lib.Judge
    mode: str = "judge"
    log_path: str | None = None

    def __post_init__(self):
        if self.mode not in GRADERS[1:]:
            raise ValueError(f"grader mode={self.mode!r} must be one of {GRADERS[1:]}")

    def start(self, iteration: int) -> None:
        """Keeps the log's rows of the iterations before `iteration` (a run resumed from its
        checkpoint redoes the later ones; a fresh run starts an empty log)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            keep = [line for line in f if _log_iteration(line) < iteration]
        atomic.write_text(self.log_path, "".join(keep))

    def __call__(
        self,
        items: Sequence[tuple[prompt_sets.Problem, str, float]],
        *,
        iteration: int,
    ) -> tuple[list[tuple[float, dict] | None], dict[str, float]]:
        """Grades (problem, response, rule score) items; returns (per item (score, info) or None
        where the rules stand, statistics)."""
        ask = [i for i, (_, _, r) in enumerate(items) if self.mode == "judge" or r < 1.0]
        judged = self.judge(
            [judge_lib.JudgeItem(items[i][0].prompt, items[i][0].answer, items[i][1]) for i in ask]
        )
        out: list[tuple[float, dict] | None] = [None] * len(items)
        usable = disagree = tokens = 0
        records = []
        for i, j in zip(ask, judged, strict=True):
            problem, response, rule = items[i]
            tokens += j.judge_tokens
            if not j.fallback_used:
                usable += 1
                disagree += j.verdict.correct != (rule >= 1.0)
            info = dict(j.info, judge=j.verdict.status, judge_text=j.text, rules=rule)
            out[i] = (j.score, info)
            records.append(
                {
                    "iteration": iteration,
                    "problem": problem.id,
                    "response_end": response[-300:],
                    "rules": rule,
                    "judge_status": j.verdict.status,
                    "judge_text": j.text,
                    "score": j.score,
                }
            )
        if self.log_path and records:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        stats = {
            "judge_calls": float(len(ask)),
            "judge_malformed": float(len(ask) - usable),
            "judge_disagreements": float(disagree),
            "judge_agreement": (1.0 - disagree / usable) if usable else float("nan"),
            "judge_tokens": tokens / len(ask) if ask else 0.0,
        }
        return out, stats


def _log_iteration(line: str) -> float:
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line of a killed run: dropped


def score_groups(
    groups: Sequence[partial.Group],
    problems: Sequence[prompt_sets.Problem],
    scorer: Scorer,
    *,
    iteration: int,
    length: length_reward.LengthPenaltyConfig,
    grader: Grader | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Returns (total reward float32, correct, statistics) of the samples of `groups`, row order.

    total = reward + w(iteration) * length reward within each group; `problems` is what the
    samples' `problem` indices index. With `grader`, a judge model gives the task reward of
    the responses it grades (one batch for the iteration) and its counts join the statistics.
    """
    samples = [s for g in groups for s in g.samples]
    group_size = len(groups[0].samples)
    scored = [scorer(problems[s.problem], s.response_ids, s.finish_reason) for s in samples]
    grader_stats = {}
    if grader is not None:
        ended = [i for i, s in enumerate(samples) if s.finish_reason == "stop"]
        items = [
            (problems[samples[i].problem], scorer.decode(samples[i].response_ids), scored[i][0])
            for i in ended
        ]
        graded, grader_stats = grader(items, iteration=iteration)
        for i, g in zip(ended, graded, strict=True):
            if g is not None:
                scored[i] = scorer.finish(*g)
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
        **level_stats([problems[s.problem].difficulty for s in samples], correct, lengths),
        **grader_stats,
    }
    return np.asarray(total, np.float32), correct, stats


MAX_LEVELS = 8  # more distinct difficulty values than this (a continuous score): no per-level keys


def level_stats(levels: Sequence[float | None], correct, lengths) -> dict[str, float]:
    """Returns accuracy, mean response length and sample count per difficulty level.

    Keys are "level/<d>/accuracy", "level/<d>/response_length" and "level/<d>/samples" (k1.5
    Fig. 5 follows length per difficulty during RL). Samples without a level are left out; none
    are returned when the problems carry no level or more than `MAX_LEVELS` distinct ones.
    """
    labels = np.array([np.nan if x is None else float(x) for x in levels])
    known = sorted(set(labels[~np.isnan(labels)].tolist()))
    if not known or len(known) > MAX_LEVELS:
        return {}
    correct, lengths = np.asarray(correct, np.float64), np.asarray(lengths, np.float64)
    out = {}
    for level in known:
        sel = labels == level
        name = f"level/{level:g}"
        out[f"{name}/accuracy"] = float(correct[sel].mean())
        out[f"{name}/response_length"] = float(lengths[sel].mean())
        out[f"{name}/samples"] = int(sel.sum())
    return out
