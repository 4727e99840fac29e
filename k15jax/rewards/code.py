"""Code reward: extract the program from a response and judge it in the sandbox.

`reward(prompt, response, answer_or_tests, sandbox=...)` has the interface of
`rewards.math.reward` once a sandbox is bound (`scoring.reward_fn("code", sandbox=...)`; the run
owns the sandbox and its `SandboxConfig`). The
third argument (a dict, or its JSON text as stored in a JSONL "answer" field) is either

- stdin/stdout tests: {"tests": [{"input": "...", "output": "..."}, ...]}, or
- a function test (HumanEval style): {"test": "def check(candidate): ...",
  "entry_point": "f", "prompt": "def f(...):\\n    \\"\\"\\"...\\"\\"\\"\\n"} — the response may
  complete `prompt` (body only) or give the whole function; or {"asserts": ["assert f(1) == 2"]}.

Reward 1 if every test passes, else 0 (k1.5 §2.3.5: binary); partial credit is an option.
Function tests run in a checker process the program cannot reach (`judge_function`):
a HumanEval prompt is trusted problem code and runs there too, so its helpers (e.g. the
`encode_cyclic` a `decode_cyclic` test calls) are the prompt's, not the response's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time

from k15jax.rewards import sandbox as sandbox_lib
from k15jax.rewards.sandbox import MEMORY, PASSED, RUNTIME, TIMEOUT, VERDICTS, WRONG

# ------------------------------------------------------------------------ judging


@dataclasses.dataclass(frozen=True)
class Judgement:
    """Per-test verdicts and the reward of one submission."""

    verdicts: tuple[str, ...]
    reward: float
    details: tuple[str, ...] = ()

    @property
    def passed(self) -> int:
        return sum(v == PASSED for v in self.verdicts)


def _reward(verdicts, partial_credit: bool) -> float:
    if not verdicts:
        return 0.0
    if partial_credit:
        return sum(v == PASSED for v in verdicts) / len(verdicts)
    return float(all(v == PASSED for v in verdicts))


_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")


def output_tokens(text: str) -> list[str]:
    """Returns the tokens of a program's output: split on ASCII whitespace only.

    As CP judges compare: runs of space, tab, newline, carriage return, form feed and vertical
    tab separate tokens and their amount does not matter. Other characters, Unicode
    separators included (U+00A0, U+2028, U+3000, ...), belong to tokens: "1\u00a02" is one
    token, not equal to "1 2".
    """
    return [t for t in _ASCII_SPACE.split(text) if t]


def outputs_match(got: str, want: str) -> bool:
    """Whether two outputs have the same `output_tokens`."""
    return output_tokens(got) == output_tokens(want)


def check_stdio_tests(tests) -> None:
    """Raises ValueError naming the first test that is not {"input": str, "output": str}."""
    if not isinstance(tests, list):
        raise ValueError(f"tests must be a list, got {type(tests).__name__}")
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or not {"input", "output"} <= set(t):
            raise ValueError(f"tests[{i}] must have 'input' and 'output' fields: {t!r:.80}")
        for field in ("input", "output"):
            if not isinstance(t[field], str):
                raise ValueError(
                    f"tests[{i}][{field!r}] must be a string, got {type(t[field]).__name__}"
                )


def judge_stdio(
    sandbox: sandbox_lib.Sandbox,
    program: str,
    tests: list[dict],
    *,
    partial_credit: bool = False,
    stop_at_first_failure: bool = False,
) -> Judgement:
    """Runs a Python program once per test ({"input", "output"}) and compares stdout.

    Reward 1 if every test passes, else 0 (k1.5: binary); `partial_credit` gives the fraction.
    After a timeout (`SandboxConfig.stop_after_timeout`), any failure with
    `stop_at_first_failure`, or once `problem_wall_s` is spent, the remaining tests are not
    run and take that verdict (TIMEOUT for the wall budget). Malformed tests raise ValueError.
    """
    check_stdio_tests(tests)
    cfg = sandbox.cfg
    deadline = time.monotonic() + cfg.problem_wall_s
    verdicts, details = [], []
    for i, test in enumerate(tests):
        if time.monotonic() > deadline:
            verdicts += [TIMEOUT] * (len(tests) - i)
            details += ["the problem's wall budget is spent"] * (len(tests) - i)
            break
        r = sandbox.run({"main.py": program}, ["python", "main.py"], test["input"])
        v = r.verdict
        if v == PASSED and not outputs_match(r.stdout, test["output"]):
            v = WRONG
        verdicts.append(v)
        details.append(r.stderr[-300:] if v in (RUNTIME, MEMORY) else "")
        if stop_at_first_failure and v != PASSED or cfg.stop_after_timeout and v == TIMEOUT:
            verdicts += [v] * (len(tests) - i - 1)
            details += ["not run"] * (len(tests) - i - 1)
            break
    return Judgement(tuple(verdicts), _reward(verdicts, partial_credit), tuple(details))


def judge_function(
    sandbox: sandbox_lib.Sandbox,
    program: str,
    tests: list[str],
    *,
    partial_credit: bool = False,
    prelude: str = "",
    entry_point: str | None = None,
) -> Judgement:
    """Runs each test snippet (asserts) in a checker that calls the program's functions.

    A test passes when it runs to the end without an exception (HumanEval style: pass
    `test_code + "\\ncheck(entry_point)"` as one test). The program's process only answers
    calls with plain data (`wire.py`); the tests run in another process, as another uid, and
    the program never sees them. `prelude` is trusted problem code run in the checker first
    (a HumanEval prompt's helpers); the program's functions stand in for names it does not
    define, and always for `entry_point`. A test left without a verdict (the run timed out,
    ran out of memory, or the program died) gets the run's verdict (else runtime_error).
    """
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise ValueError("function tests must be a list of strings")
    checker = {"tests": tests, "prelude": prelude, "entry_point": entry_point}
    r = sandbox.run_checked(program, checker)
    found: dict[int, str] = {}
    errors: dict[int, str] = {}
    for line in r.stdout.splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            row = json.loads(line)
            i, v = row["test"], row["verdict"]
            if type(i) is int and v in VERDICTS and i not in found:
                found[i], errors[i] = v, str(row.get("error", ""))
    fallback = r.verdict if r.verdict in (TIMEOUT, MEMORY) else RUNTIME
    verdicts = [found.get(i, fallback) for i in range(len(tests))]
    details = [errors.get(i, r.stderr[-300:]) for i in range(len(tests))]
    return Judgement(tuple(verdicts), _reward(verdicts, partial_credit), tuple(details))


# ------------------------------------------------------------------------ responses

_TAG = re.compile(r"[ \t]*([A-Za-z0-9_+-]*)")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Returns (language tag, body) of each ```tag ... ``` block, scanning the text once.

    A block opens at ``` and runs to the next ```; its tag is the word after the opening
    fence. (A regular expression for this backtracks quadratically on a long unclosed fence,
    and the response is the policy's to choose.)
    """
    blocks, pos = [], 0
    while (start := text.find("```", pos)) >= 0:
        eol = text.find("\n", start + 3)
        if eol < 0:
            break
        end = text.find("```", eol + 1)
        if end < 0:
            break
        tag = _TAG.match(text, start + 3, eol).group(1)
        blocks.append((tag.lower(), text[eol + 1 : end]))
        pos = end + 3
    return blocks


def extract_code(response: str) -> str | None:
    """Returns the last fenced code block tagged python (or untagged), else None."""
    for lang, body in reversed(_fenced_blocks(response)):
        if lang in ("python", "py", "python3", ""):
            return body
    return None


def parse_tests(answer_or_tests) -> dict:
    """Returns the tests as a dict; raises ValueError naming the first malformed field."""
    tests = answer_or_tests
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise ValueError(f"code tests are not valid JSON: {err} in {tests[:80]!r}") from err
        except RecursionError:
            raise ValueError(f"code tests nest too deeply: {tests[:80]!r}") from None
    if not isinstance(tests, dict):
        raise ValueError(f"code tests must be a JSON object, got {type(tests).__name__}")
    if "tests" in tests:
        check_stdio_tests(tests["tests"])
    elif "test" in tests:
        for field in ("test", "entry_point", "prompt"):
            if field in tests and not isinstance(tests[field], str):
                raise ValueError(f"{field!r} must be a string, got {type(tests[field]).__name__}")
        if "entry_point" not in tests:
            raise ValueError("a function test needs 'entry_point' beside 'test'")
        if not tests["entry_point"].isidentifier():
            raise ValueError(f"entry_point {tests['entry_point']!r} must be an identifier")
    elif "asserts" in tests:
        asserts = tests["asserts"]
        if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
            raise ValueError(f"'asserts' must be a list of strings: {asserts!r:.80}")
    else:
        raise ValueError(f"code tests need 'tests', 'test' or 'asserts'; got {sorted(tests)}")
    return tests


def judge(
    program: str,
    tests: dict,
    *,
    sandbox: sandbox_lib.Sandbox,
    partial_credit: bool = False,
) -> Judgement:
    """Judges `program` against parsed `tests` (see `parse_tests`) in `sandbox`."""
    box = sandbox
    if "tests" in tests:
        return judge_stdio(box, program, tests["tests"], partial_credit=partial_credit)
    if "test" in tests:
        prompt, entry = tests.get("prompt", ""), tests["entry_point"]
        if prompt and f"def {entry}" not in program:
            program = prompt + program  # the response completed the prompt's body
        return judge_function(
            box, program, [tests["test"] + f"\ncheck({entry})\n"],
            partial_credit=partial_credit, prelude=prompt, entry_point=entry,
        )  # fmt: skip
    return judge_function(box, program, tests["asserts"], partial_credit=partial_credit)


def reward(
    prompt: str,
    response: str,
    answer_or_tests,
    *,
    sandbox: sandbox_lib.Sandbox,
    partial_credit: bool = False,
) -> tuple[float, dict]:
    """Returns (reward, info): 1.0 if the response's code passes every test, else 0.0."""
    del prompt
    tests = parse_tests(answer_or_tests)
    program = extract_code(response)
    if program is None:
        return 0.0, {"verdicts": (), "reason": "no code block"}
    j = judge(program, tests, sandbox=sandbox, partial_credit=partial_credit)
    return j.reward, {"verdicts": j.verdicts, "passed": j.passed}
