"""CYaRon test generation end to end: real generators, buggy "ground truth", 7/10 and 9/10.

The shipped problems (tests/data/testgen_problems.jsonl) mix correct solutions with
deliberately buggy ones; the test recomputes every expected output with its own reference
code and checks which cases and problems the rules keep.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from k15jax.rewards import sandbox, testgen

DATA = pathlib.Path(__file__).parent / "data"
REASON = sandbox.check_isolation()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no isolation: {REASON}")
CFG = testgen.TestGenConfig(num_cases=10, min_valid_cases=2)


def _fib(n: int, mod: int | None = 10**9 + 7) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, (a + b) % mod if mod else a + b
    return a


@pytest.fixture(scope="module")
def outcomes():
    rows = [json.loads(x) for x in (DATA / "testgen_problems.jsonl").read_text().splitlines()]
    with sandbox.Sandbox(sandbox.SandboxConfig(cpu_s=1, wall_s=3)) as box:
        return {
            r["id"]: testgen.build_tests(box, r["generator"], r["solutions"], CFG, problem_seed=i)
            for i, r in enumerate(rows)
        }


def test_fibonacci_seven_of_ten_agree(outcomes):
    """3 of 10 solutions forget the modulus: where they differ, 7 still agree (valid)."""
    r = outcomes["fib_3_buggy"]
    ns = [int(t["input"]) for t in r.tests]
    assert r.generated == 10 and len(ns) == 10  # every case valid
    assert any(_fib(n) != _fib(n, None) for n in ns)  # some cases separate the buggy ones
    for t, n in zip(r.tests, ns, strict=True):
        assert t["output"].split() == [str(_fib(n))]  # the majority is the right answer
    assert r.solutions_passing == 7 and not r.kept  # 7 < 9


def test_fibonacci_six_of_ten_is_not_enough(outcomes):
    """4 of 10 forget the modulus: cases that separate them have only 6 agreeing (invalid)."""
    r = outcomes["fib_4_buggy"]
    ns = [int(t["input"]) for t in r.tests]
    assert sorted(r.case_agreement)[0] == 6  # at least one case was dropped at 6/10
    assert len(ns) == sum(a >= 7 for a in r.case_agreement)
    assert all(_fib(n) == _fib(n, None) for n in ns)  # only cases all solutions agree on
    assert len(ns) >= CFG.min_valid_cases and r.solutions_passing == 10 and r.kept


def test_maximum_nine_of_ten_pass(outcomes):
    """One solution starts its maximum at 0 and fails on all-negative lists: 9/10 pass."""
    r = outcomes["max_1_buggy"]
    assert len(r.tests) == 10
    for t in r.tests:
        xs = [int(x) for x in t["input"].split()[1:]]
        assert t["output"].split() == [str(max(xs))]
    assert any(max(int(x) for x in t["input"].split()[1:]) < 0 for t in r.tests)
    assert r.solutions_passing == 9 and r.kept


def test_maximum_eight_of_ten_is_dropped(outcomes):
    r = outcomes["max_2_buggy"]
    assert len(r.tests) == 10 and r.solutions_passing == 8 and not r.kept


def test_generation_is_deterministic_and_validated():
    gen = "from cyaron import randint\nprint(randint(1, 10**9))\n"
    with sandbox.Sandbox(sandbox.SandboxConfig(cpu_s=1, wall_s=3)) as box:
        a = testgen.generate_inputs(box, gen, 4, seed=5)
        b = testgen.generate_inputs(box, gen, 4, seed=5)
        broken = testgen.generate_inputs(box, "raise ValueError('bad generator')\n", 3, seed=0)
    assert a == b and len(set(a)) == 4
    assert broken == []
    with pytest.raises(ValueError, match="min_agree"):
        testgen.TestGenConfig(min_agree=11)


def test_cli_writes_kept_problems_and_summary(tmp_path):
    out = tmp_path / "with_tests.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"generator": "print(1)", "solutions": ["print(1)"]}\n{"generator": "x"}\n')
    cmd = [sys.executable, "-m", "experiments.gen_tests", "--num_cases=4", "--min_valid_cases=1"]
    proc = subprocess.run([*cmd, f"--problems={bad}", f"--out={out}"], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[1])  # fmt: skip
    assert proc.returncode != 0 and f"{bad}:2: missing field(s) ['solutions']" in proc.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps(
            {
                "id": "double",
                "generator": "from cyaron import randint\nprint(randint(1, 99))",
                "solutions": ["print(2 * int(input()))"] * 10,
            }
        )
        + "\n"  # fmt: skip
    )
    proc = subprocess.run([*cmd, f"--problems={good}", f"--out={out}"], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[1])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "problems kept (>= 9/10 pass): 1" in proc.stdout
    row = json.loads(out.read_text())
    assert row["id"] == "double" and len(row["tests"]) == 4
    assert json.loads(row["answer"]) == {"tests": row["tests"]}
    for t in row["tests"]:
        assert int(t["output"]) == 2 * int(t["input"])
