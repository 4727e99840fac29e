"""Turns a JSONL of code problems into a JSONL of problems with generated, filtered tests.

  python -m experiments.gen_tests --problems=tests/data/testgen_problems.jsonl \\
      --out=runs/problems_with_tests.jsonl --min_valid_cases=5

Input lines: {"id": ..., "problem": "statement", "generator": "CYaRon program printing one
input", "solutions": ["ground-truth program", ...]} (other fields are kept). Output lines: the
kept problems (all with --keep_all) plus "tests": [{"input", "output"}], "testgen" stats, and
"prompt" / "answer" (the tests as JSON) so the file is a prompt set for `--reward=code`.
Prints a summary like k1.5 §2.3.5's: problems in, problems with >= min_valid_cases valid
cases, problems kept. Every generator and solution runs in `k15jax.rewards.sandbox`.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from k15jax.infra import atomic

_PROBLEMS = flags.DEFINE_string("problems", None, "JSONL of problems.", required=True)
_OUT = flags.DEFINE_string("out", "runs/problems_with_tests.jsonl", "Output JSONL.")
_KEEP_ALL = flags.DEFINE_bool("keep_all", False, "Write dropped problems too (kept=false).")
_NUM_CASES = flags.DEFINE_integer("num_cases", 50, "Generator runs per problem.")
_NUM_SOLUTIONS = flags.DEFINE_integer("num_solutions", 10, "Solutions sampled per problem.")
_MIN_AGREE = flags.DEFINE_integer("min_agree", 7, "Agreeing outputs for a valid case.")
_MIN_PASS = flags.DEFINE_integer("min_pass", 9, "Solutions passing all cases to keep.")
_MIN_VALID = flags.DEFINE_integer("min_valid_cases", 40, "Valid cases needed to keep.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of sampling and of the generators.")
_CPU_S = flags.DEFINE_float("cpu_s", 2.0, "CPU seconds per program run.")


def make_config():
    from k15jax.rewards import testgen

    return testgen.TestGenConfig(
        num_cases=_NUM_CASES.value, num_solutions=_NUM_SOLUTIONS.value,
        min_agree=_MIN_AGREE.value, min_pass=_MIN_PASS.value,
        min_valid_cases=_MIN_VALID.value, seed=_SEED.value,
    )  # fmt: skip


def read_problems(path: str) -> list[dict]:
    """Returns the problems of a JSONL file; raises ValueError naming the file and line."""
    problems = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON: {err}") from err
            missing = [k for k in ("generator", "solutions") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
            if not isinstance(row["solutions"], list) or not row["solutions"]:
                raise ValueError(f"{path}:{lineno}: 'solutions' must be a non-empty list")
            problems.append(row)
    return problems


def main(argv):
    del argv
    from k15jax.rewards import sandbox, testgen

    cfg = make_config()
    problems = read_problems(_PROBLEMS.value)
    start = time.perf_counter()
    results = []
    with sandbox.Sandbox(sandbox.SandboxConfig(cpu_s=_CPU_S.value)) as box:
        for i, row in enumerate(problems):
            r = testgen.build_tests(box, row["generator"], row["solutions"], cfg, problem_seed=i)
            results.append(r)
            print(f"{row.get('id', i)}: {r.generated} inputs, {len(r.tests)} valid, "
                  f"{r.solutions_passing}/{r.sampled} pass, kept={r.kept}", flush=True)  # fmt: skip
    lines = []
    for row, r in zip(problems, results, strict=True):
        if r.kept or _KEEP_ALL.value:
            stats = {k: v for k, v in dataclasses.asdict(r).items() if k != "tests"}
            # "prompt" and "answer" make the file a prompt set for `--reward=code`.
            out = {"prompt": row.get("prompt", row.get("problem", "")), **row}
            out.update(answer=json.dumps({"tests": r.tests}), tests=r.tests, testgen=stats)
            lines.append(json.dumps(out) + "\n")
    atomic.write_text(_OUT.value, "".join(lines))  # never a half-written output file
    enough = sum(len(r.tests) >= cfg.min_valid_cases for r in results)
    print(f"\nproblems in: {len(problems)}")
    print(f"generators that produced inputs: {sum(r.generated > 0 for r in results)}")
    print(f"problems with >= {cfg.min_valid_cases} valid cases: {enough}")
    print(f"problems kept (>= {cfg.min_pass}/{cfg.num_solutions} pass): "
          f"{sum(r.kept for r in results)}")  # fmt: skip
    print(f"wrote {_OUT.value} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    app.run(main)
