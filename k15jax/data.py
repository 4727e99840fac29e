"""Where problems come from: the built-in task or JSONL files, split into RL pool and held-out.

JSONL: one problem per line with `prompt` and `answer`.

Optional fields: `id` (default `<file>:<line>`), `difficulty` (a number; `level` is used when it
is absent, as in the MATH set), `source`. Other fields are ignored. A bad line raises `DataError`
naming the file, the line number and the problem; an empty set is an error too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from k15jax import tasks

REWARDS = ("task", "math", "code")  # scoring.reward_fn builds each


class DataError(ValueError):
    """A prompt file that cannot be used, with the file and line that are wrong."""


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str
    difficulty: float | None = None
    source: str | None = None


def _problem(obj, where: str, default_id: str) -> Problem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise DataError(f"{where}: field 'answer' must be a string or number, got {answer!r}")
    if isinstance(answer, str) and not answer.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    difficulty = obj.get("difficulty", obj.get("level"))
    if difficulty is not None and (
        isinstance(difficulty, bool) or not isinstance(difficulty, int | float)
    ):
        raise DataError(f"{where}: field 'difficulty' must be a number, got {difficulty!r}")
    pid = obj.get("id", default_id)
    source = obj.get("source")
    return Problem(
        id=str(pid),
        prompt=prompt,
        answer=str(answer),
        difficulty=None if difficulty is None else float(difficulty),
        source=None if source is None else str(source),
    )


def load_jsonl(path: str) -> list[Problem]:
    """Returns the problems of a JSONL file, in file order.

    Raises:
      DataError: for an unreadable file, a malformed line, a missing or mistyped field, a
        duplicate id, or a file without problems.
    """
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    problems, seen = [], {}
    name = os.path.basename(path)
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            problem = _problem(obj, where, f"{name}:{lineno}")
            if problem.id in seen:
                raise DataError(
                    f"{where}: duplicate id {problem.id!r} (first on line {seen[problem.id]})"
                )
            seen[problem.id] = lineno
            problems.append(problem)
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Where problems come from: the built-in task, or JSONL files with a reward."""

    data: str | None = None  # JSONL prompt set; None: the built-in arithmetic task
    eval_data: str | None = None  # JSONL held-out set; None: the hashed split of `data`
    reward: str = "task"  # "task" (built-in checker), "math" (math-verify), "code" (sandbox)
    prompt_template: str = "{prompt}"
    max_prompt_tokens: int = 24  # longest prompt (sets the trainer's sequence length)
    train_problems: int = 512  # built-in task: size of the RL pool
    sft_examples: int = 8000  # built-in task: warm-up traces
    # Fraction of warm-up traces that answer directly (the solver's short trace) instead of
    # reasoning step by step; RL then learns from reward when long reasoning pays off.
    short_fraction: float = 0.0
    min_terms: int = 2
    max_terms: int = 4
    max_term: int = 9  # built-in task: terms are 1..max_term

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r} must be one of {REWARDS}")
        if not 0 <= self.short_fraction <= 1:
            raise ValueError(f"short_fraction={self.short_fraction} must be in [0, 1]")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain {{prompt}}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ProblemSet:
    """The problems of a run: RL pool, held-out set and warm-up traces (prompt, response)."""

    train: tuple[Problem, ...]
    held_out: tuple[Problem, ...]
    sft_traces: tuple[tuple[str, str], ...]  # empty for JSONL sets


def load_problems(task: TaskConfig, *, held_out_problems: int, seed: int) -> ProblemSet:
    """Returns the run's problems: generated (built-in task) or read from `task.data`."""
    if task.data is None:
        gen = dict(min_terms=task.min_terms, max_terms=task.max_terms, max_term=task.max_term)
        sft_set = tasks.generate(task.sft_examples, seed=seed, unique=False, **gen)
        pool = tasks.generate(task.train_problems, seed=seed + 1, **gen)
        held = tasks.generate(held_out_problems, seed=seed, split="held_out", **gen)
        as_problem = lambda i, e: Problem(str(i), e.prompt, e.answer, e.difficulty)  # noqa: E731
        short = np.random.default_rng([seed, 2]).random(len(sft_set)) < task.short_fraction
        return ProblemSet(
            train=tuple(as_problem(i, e) for i, e in enumerate(pool)),
            held_out=tuple(as_problem(i, e) for i, e in enumerate(held)),
            sft_traces=tuple(
                (e.prompt, e.short_trace if s else e.long_trace)
                for e, s in zip(sft_set, short, strict=True)
            ),
        )
    problems = load_jsonl(task.data)
    if task.eval_data:
        train, held_out = problems, load_jsonl(task.eval_data)
    else:
        train = [p for p in problems if not tasks.is_held_out(p.prompt)]
        held_out = [p for p in problems if tasks.is_held_out(p.prompt)]
    return ProblemSet(tuple(train), tuple(held_out[:held_out_problems]), ())


def select(problems: Sequence[Problem], ids: Sequence[str]) -> tuple[Problem, ...]:
    """Returns the problems with `ids`, in the order of `ids` (a saved selection restored)."""
    by_id = {p.id: p for p in problems}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"problems {missing[:5]} of the saved run are not in the prompt set")
    return tuple(by_id[i] for i in ids)


def prompt_ids(
    problem: Problem, *, encode: Callable[[str], list[int]], max_tokens: int
) -> list[int]:
    """Returns `encode(problem.prompt)` (the encoder applies any prompt template); refuses a
    prompt longer than `max_tokens`."""
    ids = encode(problem.prompt)
    if len(ids) > max_tokens:
        raise DataError(
            f"problem {problem.id}: prompt of {len(ids)} tokens exceeds "
            f"max_prompt_tokens={max_tokens}"
        )
    return ids
