"""Prompt sets from JSONL files: one problem per line with `prompt` and `answer`.

Optional fields: `id` (default `<file>:<line>`), `difficulty` (a number; `level` is used when it
is absent, as in the MATH set), `source`. Other fields are ignored. A bad line raises `DataError`
naming the file, the line number and the problem; an empty set is an error too.
"""

from __future__ import annotations

import dataclasses
import json
import os


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
