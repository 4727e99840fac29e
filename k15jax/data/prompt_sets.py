"""Where problems come from: the built-in task or JSONL files, split into RL pool and held-out.

JSONL: one problem per line with `prompt` and `answer`.

Optional fields: `id` (default `<file>:<line>`), `difficulty` (a number; `level` is used when it
is absent, as in the MATH set), `source`, `response` (a worked solution: the row is also a long-CoT
SFT trace for the warm-up). Other fields are ignored. A bad line raises `DataError` naming the
file, the line number and the problem; an empty set is an error too.

SFT files (`TaskConfig.sft_data`, `load_traces`): one trace per line with `prompt` and `response`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Sequence

import numpy as np

from k15jax.data import answer_forms, tasks

# scoring.reward_fn builds each; "forms" is the built-in task's checker of `answer_forms`
REWARDS = ("task", "forms", "math", "code")
OVERLONG = ("drop", "error")  # what a run does with a prompt over max_prompt_tokens


class DataError(ValueError):
    """A prompt file that cannot be used, with the file and line that are wrong."""


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    prompt: str
    answer: str
    difficulty: float | None = None
    source: str | None = None
    response: str | None = None  # a worked solution (an SFT trace), if the file has one


def _text(obj, field: str, where: str, *, required: bool = True) -> str | None:
    """Returns the non-empty string `obj[field]` (None if absent and not `required`)."""
    value = obj.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _problem(obj, where: str, default_id: str) -> Problem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = _text(obj, "prompt", where)
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
        response=_text(obj, "response", where, required=False),
    )


def _objects(path: str):
    """Yields (line number, "file:line", parsed JSON value) of each non-blank line of `path`."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def load_jsonl(path: str) -> list[Problem]:
    """Returns the problems of a JSONL file, in file order.

    Raises:
      DataError: for an unreadable file, a malformed line, a missing or mistyped field, a
        duplicate id, or a file without problems.
    """
    problems, seen = [], {}
    name = os.path.basename(path)
    for lineno, where, obj in _objects(path):
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


def load_traces(path: str) -> list[tuple[str, str]]:
    """Returns the (prompt, response) SFT traces of a JSONL file, in file order.

    Raises:
      DataError: for an unreadable file, a malformed line, a missing or empty `prompt` or
        `response`, or a file without traces.
    """
    traces = []
    for _, where, obj in _objects(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        traces.append((_text(obj, "prompt", where), _text(obj, "response", where)))
    if not traces:
        raise DataError(f"{path}: no SFT traces (the file is empty)")
    return traces


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Where problems come from: the built-in task, or JSONL files with a reward."""

    data: str | None = None  # JSONL prompt set; None: the built-in arithmetic task
    eval_data: str | None = None  # JSONL held-out set; None: the hashed split of `data`
    # JSONL of (prompt, response) long-CoT traces for the SFT warm-up, added to the `response`
    # rows of `data` (and, for the built-in task, to its own traces).
    sft_data: str | None = None
    # Wrap each prompt (after `prompt_template`) in the model's chat template as the user turn,
    # for rollouts, evaluation and SFT alike (`tokenizer.Tokenizer.apply_chat_template`).
    chat_template: bool = False
    # "task" (built-in checker: "answer: <digits>"), "forms" (built-in task, final answers in
    # `answer_forms.FINAL_SHAPES`), "math" (math-verify), "code" (sandbox)
    reward: str = "task"
    prompt_template: str = "{prompt}"
    max_prompt_tokens: int = 24  # longest prompt (sets the trainer's sequence length)
    # A prompt over max_prompt_tokens: "drop" it before training (counted in the report, as
    # verl does) or stop the run ("error", naming the first one).
    overlong_prompts: str = "drop"
    screen: bool = True  # JSONL RL pool: leave out multiple-choice, true/false, proofs (`screen`)
    # The easy-to-hack check's forced response start: the model answers with no reasoning.
    answer_prefix: str = "answer: "
    train_problems: int = 512  # built-in task: size of the RL pool
    sft_examples: int = 8000  # built-in task: warm-up traces
    # Fraction of warm-up traces that answer directly (the solver's short trace) instead of
    # reasoning step by step; RL then learns from reward when long reasoning pays off.
    short_fraction: float = 0.0
    family: str = "sums"  # built-in task: `tasks.FAMILIES`
    min_terms: int = 2  # family "sums": terms per problem (its difficulty levels)
    max_terms: int = 4
    max_term: int = 9  # family "sums": terms are 1..max_term
    min_digits: int = 2  # family "columns": digits of both numbers (its difficulty levels)
    max_digits: int = 4
    # Built-in task: each warm-up trace writes its final answer in a form drawn from
    # `answer_forms.FINAL_SHAPES` ("12", "12.0", "twelve"); needs reward "forms" (their checker).
    answer_forms: bool = False

    def __post_init__(self):
        if self.family not in tasks.FAMILIES:
            raise ValueError(f"family={self.family!r} must be one of {tasks.FAMILIES}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r} must be one of {REWARDS}")
        if not 0 <= self.short_fraction <= 1:
            raise ValueError(f"short_fraction={self.short_fraction} must be in [0, 1]")
        if self.answer_forms and (self.data is not None or self.reward != "forms"):
            raise ValueError(
                "answer_forms is for the built-in task's traces (not --data) and needs "
                "--reward=forms: the digits checker reads 'answer: 12.5' as 12"
            )
        if self.answer_forms and self.max_terms * self.max_term > 97:
            raise ValueError(
                f"answer_forms writes sums as words up to 99: max_terms={self.max_terms} x "
                f"max_term={self.max_term} is over it"
            )
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain {{prompt}}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        if self.overlong_prompts not in OVERLONG:
            raise ValueError(
                f"overlong_prompts={self.overlong_prompts!r} must be one of {OVERLONG}"
            )


@dataclasses.dataclass(frozen=True)
class ProblemSet:
    """The problems of a run: RL pool, held-out set and warm-up traces (prompt, response)."""

    train: tuple[Problem, ...]
    held_out: tuple[Problem, ...]
    sft_traces: tuple[tuple[str, str], ...]  # JSONL sets: the rows with a `response`


def load_problems(task: TaskConfig, *, held_out_problems: int, seed: int) -> ProblemSet:
    """Returns the run's problems: generated (built-in task) or read from `task.data`."""
    if task.data is None:
        gen = dict(
            family=task.family,
            min_terms=task.min_terms,
            max_terms=task.max_terms,
            max_term=task.max_term,
            min_digits=task.min_digits,
            max_digits=task.max_digits,
        )
        try:
            sft_set = tasks.generate(task.sft_examples, seed=seed, unique=False, **gen)
            pool = tasks.generate(task.train_problems, seed=seed + 1, **gen)
            held = tasks.generate(held_out_problems, seed=seed, split="held_out", **gen)
        except ValueError as e:  # too few distinct sums for the sizes asked: a flag to change
            raise DataError(
                f"built-in task: {e}; ask for fewer problems (--train_problems, --eval_problems) "
                "or allow more sums (--max_terms, --max_term)"
            ) from e
        as_problem = lambda i, e: Problem(str(i), e.prompt, e.answer, e.difficulty)  # noqa: E731
        short = np.random.default_rng([seed, 2]).random(len(sft_set)) < task.short_fraction
        traces = [
            (e.prompt, e.short_trace if s else e.long_trace)
            for e, s in zip(sft_set, short, strict=True)
        ]
        if task.answer_forms:
            rng = random.Random(f"answer_forms:{seed}")
            traces = [
                (p, answer_forms.with_answer(t, answer_forms.render(
                    int(e.answer), rng.choice(answer_forms.FINAL_SHAPES), rng
                )))
                for (p, t), e in zip(traces, sft_set, strict=True)
            ]  # fmt: skip
        return ProblemSet(
            train=tuple(as_problem(i, e) for i, e in enumerate(pool)),
            held_out=tuple(as_problem(i, e) for i, e in enumerate(held)),
            sft_traces=tuple(traces),
        )
    problems = load_jsonl(task.data)
    if task.eval_data:
        train, held_out = problems, load_jsonl(task.eval_data)
    else:
        train = [p for p in problems if not tasks.is_held_out(p.prompt)]
        held_out = [p for p in problems if tasks.is_held_out(p.prompt)]
    traces = tuple((p.prompt, p.response) for p in train if p.response is not None)
    return ProblemSet(tuple(train), tuple(held_out[:held_out_problems]), traces)


@dataclasses.dataclass(frozen=True)
class Removed:
    """The problems a run leaves out before training, by why (ids, in file order)."""

    screened: dict[str, tuple[str, ...]]  # `screen` reason -> RL-pool ids (JSONL pools only)
    overlong_train: tuple[str, ...] = ()  # RL-pool prompts over max_prompt_tokens
    overlong_held_out: tuple[str, ...] = ()  # held-out prompts over max_prompt_tokens
    sft_held_out: int = 0  # SFT traces whose prompt is a held-out problem's (no leak into eval)
    sft_overlong: int = 0  # SFT traces longer than a trainer row (max_prompt_tokens + max_length)

    def counts(self) -> dict:
        """Returns the numbers removed: {"screen": {reason: n}, "overlong": {split: n}}."""
        return {
            "screen": {reason: len(ids) for reason, ids in self.screened.items()},
            "overlong": {
                "train": len(self.overlong_train),
                "held_out": len(self.overlong_held_out),
            },
            "sft": {"held_out": self.sft_held_out, "overlong": self.sft_overlong},
        }


def drop_overlong(
    problems: Sequence[Problem],
    *,
    encode: Callable[[str], list[int]],
    max_tokens: int,
    overlong: str,
    what: str,
) -> tuple[tuple[Problem, ...], tuple[str, ...]]:
    """Returns (problems whose prompt fits `max_tokens`, ids of the others), order kept.

    `encode` applies the prompt template. With `overlong="error"` an over-long prompt raises
    `DataError` naming the first one of `what` (e.g. "RL pool") and its token count.
    """
    kept, dropped = [], []
    for problem in problems:
        n = len(encode(problem.prompt))
        if n <= max_tokens:
            kept.append(problem)
        elif overlong == "error":
            raise DataError(
                f"{what}: problem {problem.id}: prompt of {n} tokens exceeds "
                f"--max_prompt_tokens={max_tokens} (raise it, or --overlong_prompts=drop to "
                "leave such prompts out)"
            )
        else:
            dropped.append(problem.id)
    return tuple(kept), tuple(dropped)


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
