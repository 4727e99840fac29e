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
import re
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
    min_terms: int = 2
    max_terms: int = 4
    max_term: int = 9  # built-in task: terms are 1..max_term
    # Built-in task: each warm-up trace writes its final answer in a form drawn from
    # `answer_forms.FINAL_SHAPES` ("12", "12.0", "twelve"); needs reward "forms" (their checker).
    answer_forms: bool = False

    def __post_init__(self):
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
        gen = dict(min_terms=task.min_terms, max_terms=task.max_terms, max_term=task.max_term)
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


# ------------------------------------------------------------------------------ screening

SCREEN_REASONS = ("multiple_choice", "true_false", "proof")

_ASY = re.compile(r"\[asy\].*?\[/asy\]", re.S | re.I)
# A wrapper around a whole answer: $...$, \boxed{...}, \text{...} and its relatives.
_WRAPPER = re.compile(r"^\\(?:boxed|fbox|text|textbf|mathrm|mbox|textrm)\s*\{(.*)\}$", re.S)
_OPTION_LETTER = re.compile(r"^\(\s*([A-Za-z])\s*\)$|^([A-H])$")
_OPTION_LETTERS = re.compile(r"^[A-H](?:\s*,?\s*(?:and\s+)?[A-H])+$")
_TRUE_FALSE = {"true", "false", "yes", "no"}
# An inline option label: "(A)" (also inside \textbf{...}) or "\text A.".
_INLINE_LABEL = r"\(\s*{0}\s*\)|\\text\s*\{{?\s*{0}\s*\}}?\s*\."
# What makes "(A)" an argument, not a label: a letter right before it (f(A)), a one-letter name
# and a space (P (A)), or a function command (\sin (A)). A word and a space ("is (A)") or a
# spacing command ("\qquad (B)") does not.
_CALL_BEFORE = re.compile(
    r"(?:[A-Za-z]|(?<![A-Za-z\\])[A-Za-z] |\\(?:sin|cos|tan|cot|sec|csc|log|ln|exp|angle|"
    r"det|gcd|lcm|max|min|arcsin|arccos|arctan|sinh|cosh|tanh)\s*)$"
)
# A label at the start of a line (after an optional bullet): "A." "A)" "A:" "(A)", then a blank.
_LINE_LABEL = r"(?m)^[ \t$]*(?:\\bullet[ \t$]*)?\(?{0}[.):][ \t]"
_OPTION_CUE = re.compile(
    r"which of the following|correct (?:option|letter|answer choice)|letters? of the|"
    r"answer choices?|\bthe options\b|\"[A-Z]\" for |"
    r"(?-i:\$?A\$?,\s*\$?B\$?,?\s*(?:\$?[C-H]\$?,?\s*)*or\s+\$?[B-H]\b)",  # "A, B, or C"
    re.I,
)
_PROOF_CUE = re.compile(
    r"\b(?:prove|proves|proved|proving|proof|show that|demonstrate that)\b", re.I
)
_PROOF_PLACEHOLDERS = {
    "", "proof", "qed", "q.e.d", "none", "n/a", "na", "null", "see proof", "see solution",
    "see above", "see explanation", "shown", "proved", "proven", "done", "-",
}  # fmt: skip
_RELATION = re.compile(
    r"\\(?:le|ge|leq|geq|leqslant|geqslant|neq|ne|equiv|mid|implies|iff|Rightarrow|"
    r"Leftrightarrow|subset|subseteq|cong|parallel|perp|sim)(?![A-Za-z])|[<>≤≥≠]"
)


def _bare_answer(answer: str) -> str:
    """Returns `answer` without surrounding $, \\boxed{}-style wrappers and a final period."""
    text = answer.strip()
    while True:
        before = text
        text = text.strip().strip("$").strip().rstrip(".").strip()
        if m := _WRAPPER.match(text):
            text = m.group(1)
        if text == before:
            return text


def _labels_in_order(text: str, label: str, letters: str) -> bool:
    """Returns whether every label of `letters` occurs, each after the previous one."""
    pos = 0
    for letter in letters:
        for m in re.finditer(label.format(letter), text[pos:]):
            if not _CALL_BEFORE.search(text[: pos + m.start()]):
                pos += m.end()
                break
        else:
            return False
    return True


def _option_list(text: str, letters: str) -> bool:
    """Returns whether `text` labels options `letters` inline or at the starts of lines."""
    return _labels_in_order(text, _INLINE_LABEL, letters) or _labels_in_order(
        text, _LINE_LABEL, letters
    )


def _is_checkable_value(answer: str) -> bool:
    """Returns whether an answer states a value (not a proof placeholder, relation or prose)."""
    bare = _bare_answer(answer)
    if bare.lower() in _PROOF_PLACEHOLDERS or _RELATION.search(bare):
        return False
    words = re.findall(r"(?<!\\)\b[A-Za-z]{2,}\b", bare)
    return not (len(words) >= 4 and not re.search(r"\d", bare))


def screen_reason(problem: Problem) -> str | None:
    """Returns why `problem` is excluded from RL (one of `SCREEN_REASONS`), or None to keep it.

    The rules (`screen`'s docstring) are checked in the order of `SCREEN_REASONS`.
    """
    bare = _bare_answer(problem.answer)
    text = _ASY.sub(" ", problem.prompt)
    letter = _OPTION_LETTER.match(bare)
    letters = letter is not None or _OPTION_LETTERS.match(bare) is not None
    if (
        _option_list(text, "ABCD")
        or (letter is not None and letter.group(1) is not None)
        or (
            letters
            and (
                _OPTION_CUE.search(text) or _option_list(text, "ABC") or _option_list(text, "abcd")
            )
        )
    ):
        return "multiple_choice"
    if bare.lower() in _TRUE_FALSE:
        return "true_false"
    if _PROOF_CUE.search(problem.prompt) and not _is_checkable_value(problem.answer):
        return "proof"
    return None


def screen(problems: Sequence[Problem]) -> tuple[tuple[Problem, ...], dict[str, tuple[str, ...]]]:
    """Returns (kept problems, {reason: ids removed}) without the easy-to-guess kinds (k1.5 §2.1).

    The paper leaves multiple-choice, true/false and proof problems out of the RL prompt set: a
    guess earns reward without reasoning, or no answer can be checked. Rules, on the answer
    after removing $...$, \\boxed{}, \\text{}, \\textbf{}, \\mathrm{} and a final period:

    - "multiple_choice" when any of:
      - the prompt (outside [asy] drawings) labels four options A-D, whatever the answer (AMC
        problems whose answer is the option's value): inline, "(A) ... (B) ... (C) ... (D)"
        (also inside \\textbf{}/\\mathrm{}, or "\\text A."), or at the starts of lines,
        "A." "A)" "A:" (after an optional \\bullet). "(A)" right after a letter, a one-letter
        name and a space, or a LaTeX command is an argument, not a label: f(A), P (A), \\sin (A);
      - the answer is one parenthesised letter, "(C)" or "\\text{(p)}";
      - the answer is one capital letter A-H, or several ("A, C", "ACF"), and the prompt offers
        options: three labels A-C or four lowercase a-d as above, "which of the following",
        "correct option", "letter of the", "answer choice", "the options", a code ('"C" for
        circle') or an enumeration "A, B, C, or D".
      Fewer labels with any other answer are the conditions or parts of one problem ("(a) find
      x, (b) find y" with answer 8), and a bare letter without options is a computed answer
      ("the 100th letter of ABCABC..."): both are kept.
    - "true_false": the answer is True, False, Yes or No (any case). "True-false quiz"
      problems whose answer is a number are kept.
    - "proof": the prompt says "prove", "proof", "show that" or "demonstrate that" (whole words)
      and the answer states no value: it is empty or a placeholder ("proof", "QED", "N/A",
      "see solution", ...), a relation (\\le, \\geq, \\neq, \\equiv, <, >, \\implies, ...: the
      statement that was to be proved), or prose (four or more words, no digit). "Show that
      ..., then find x" with a numeric answer, "the letters of the word PROOF" and "dough must
      proof" are computations and kept; so is an answer "1" or "Alice".

    Each removed id appears under exactly one reason, the first rule that matches; every
    reason is a key of the returned dict. Order of the kept problems is preserved.
    """
    kept, dropped = [], {reason: [] for reason in SCREEN_REASONS}
    for problem in problems:
        reason = screen_reason(problem)
        if reason is None:
            kept.append(problem)
        else:
            dropped[reason].append(problem.id)
    return tuple(kept), {reason: tuple(ids) for reason, ids in dropped.items()}


def screen_line(dropped: dict[str, Sequence[str]], total: int) -> str:
    """Returns the one-line log of a `screen` result over `total` problems."""
    counts = ", ".join(f"{reason} {len(dropped.get(reason, ()))}" for reason in SCREEN_REASONS)
    removed = sum(len(ids) for ids in dropped.values())
    return f"screen removed {removed} of {total} problems ({counts})"
