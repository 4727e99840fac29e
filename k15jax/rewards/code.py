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
Function tests run in a checker process the program cannot reach (`sandbox.judge_function`):
a HumanEval prompt is trusted problem code and runs there too, so its helpers (e.g. the
`encode_cyclic` a `decode_cyclic` test calls) are the prompt's, not the response's.
"""

from __future__ import annotations

import json
import re

from k15jax.rewards import sandbox as sandbox_lib

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
        sandbox_lib.check_stdio_tests(tests["tests"])
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
) -> sandbox_lib.Judgement:
    """Judges `program` against parsed `tests` (see `parse_tests`) in `sandbox`."""
    box = sandbox
    if "tests" in tests:
        return sandbox_lib.judge_stdio(box, program, tests["tests"], partial_credit=partial_credit)
    if "test" in tests:
        prompt, entry = tests.get("prompt", ""), tests["entry_point"]
        if prompt and f"def {entry}" not in program:
            program = prompt + program  # the response completed the prompt's body
        return sandbox_lib.judge_function(
            box, program, [tests["test"] + f"\ncheck({entry})\n"],
            partial_credit=partial_credit, prelude=prompt, entry_point=entry,
        )  # fmt: skip
    return sandbox_lib.judge_function(box, program, tests["asserts"], partial_credit=partial_credit)


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
