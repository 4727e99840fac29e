"""Test-case generation with CYaRon, filtered by agreement of ground-truth solutions.

k1.5 §2.3.5 (spec §7): for a problem with ground-truth solutions and no special judge, a
generator program written with the CYaRon library produces 50 inputs; 10 randomly sampled
ground-truth solutions run on each; a case is valid if at least 7 of the 10 outputs agree
(that output becomes the expected one); the problem enters training if at least 9 of the 10
solutions pass the whole selected set. All numbers are `TestGenConfig` fields.

Choices the paper leaves open (GAP), made here:
- the 10 solutions are sampled once per problem (without replacement; all of them if fewer)
  and the same 10 decide both rules, so every run is used twice;
- a problem also needs `min_valid_cases` valid cases (default 40, the threshold the paper
  reports its statistics with: 463 of 614 generators gave >= 40 valid cases, 323 kept);
- outputs agree when their tokens (split on ASCII whitespace) agree (`code.outputs_match`);
- generator contract: `generator.py` prints one test input to stdout; it runs with
  `random` seeded by the case index (CYaRon draws from `random`) and CYaRon importable.

Generators and solutions are untrusted code: every run goes through `sandbox`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
import random

from k15jax.rewards import code as code_reward
from k15jax.rewards import sandbox as sandbox_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestGenConfig:
    """The generation and filtering numbers (defaults: k1.5 §2.3.5)."""

    num_cases: int = 50  # generator runs (inputs) per problem
    num_solutions: int = 10  # ground-truth solutions sampled per problem
    min_agree: int = 7  # of num_solutions: a case is valid if this many outputs agree
    min_pass: int = 9  # of num_solutions: the problem is kept if this many pass every case
    min_valid_cases: int = 40  # and if it has at least this many valid cases
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_agree <= self.num_solutions:
            raise ValueError(f"min_agree={self.min_agree} must be in [1, {self.num_solutions}]")
        if not 1 <= self.min_pass <= self.num_solutions:
            raise ValueError(f"min_pass={self.min_pass} must be in [1, {self.num_solutions}]")
        if self.num_cases < 1 or self.min_valid_cases < 0:
            raise ValueError(f"num_cases={self.num_cases} must be >= 1, min_valid_cases >= 0")


@dataclasses.dataclass(frozen=True)
class ProblemTests:
    """The outcome for one problem."""

    tests: list[dict]  # valid cases: {"input", "output"}
    kept: bool
    generated: int  # inputs the generator produced (runs that exited 0)
    solutions_passing: int  # of the sampled solutions, how many pass every valid case
    sampled: int  # solutions sampled
    case_agreement: list[int]  # per generated input: size of the largest agreeing group


def _cyaron_path() -> str:
    spec = importlib.util.find_spec("cyaron")
    if spec is None or spec.origin is None:
        raise RuntimeError("the `cyaron` package is not installed (it is in the project deps)")
    return os.path.dirname(os.path.dirname(spec.origin))


def _generator_harness(seed: int, cyaron_dir: str) -> str:
    return (
        "import random, sys\n"
        f"sys.path.append({cyaron_dir!r})\n"
        f"random.seed({seed})\n"
        "exec(compile(open('generator.py').read(), 'generator.py', 'exec'), "
        "{'__name__': '__main__'})\n"
    )


def generate_inputs(box: sandbox_lib.Sandbox, generator: str, num_cases: int, seed: int):
    """Returns the inputs of `num_cases` generator runs (failed runs are dropped)."""
    libs = {"cyaron": _cyaron_path()}
    seen = box.library_path("cyaron", libs["cyaron"])
    files = lambda i: {"generator.py": generator, "harness.py": _generator_harness(seed + i, seen)}
    run = lambda i: box.run(files(i), ["python", "harness.py"], libraries=libs)
    runs = box.map(run, range(num_cases))
    return [r.stdout for r in runs if r.verdict == sandbox_lib.PASSED and r.stdout.strip()]


def build_tests(
    box: sandbox_lib.Sandbox,
    generator: str,
    solutions: list[str],
    cfg: TestGenConfig = TestGenConfig(),
    *,
    problem_seed: int = 0,
) -> ProblemTests:
    """Generates inputs, runs sampled solutions on them and applies the two agreement rules."""
    if not solutions:
        raise ValueError("a problem needs ground-truth solutions")
    rng = random.Random(cfg.seed * 1_000_003 + problem_seed)
    sampled = rng.sample(solutions, min(cfg.num_solutions, len(solutions)))
    inputs = generate_inputs(box, generator, cfg.num_cases, seed=cfg.seed * 10_007 + problem_seed)
    jobs = [(s, c) for c in range(len(inputs)) for s in range(len(sampled))]
    runs = box.map(lambda j: box.run({"main.py": sampled[j[0]]}, ["python", "main.py"],
                                     inputs[j[1]]), jobs)  # fmt: skip
    out, raw = {}, {}  # (solution, case) -> output tokens (None: the run failed) / text
    for (s, c), r in zip(jobs, runs, strict=True):
        out[(s, c)] = (
            tuple(code_reward.output_tokens(r.stdout)) if r.verdict == sandbox_lib.PASSED else None
        )
        raw[(s, c)] = r.stdout
    tests, expected, agreement = [], {}, []
    for c, text in enumerate(inputs):
        counts = collections.Counter(out[(s, c)] for s in range(len(sampled)) if out[(s, c)])
        best, n = counts.most_common(1)[0] if counts else (None, 0)
        agreement.append(n)
        if n >= cfg.min_agree:
            expected[c] = best
            first = next(s for s in range(len(sampled)) if out[(s, c)] == best)
            tests.append({"input": text, "output": raw[(first, c)]})
    passes = lambda s: all(out[(s, c)] == want for c, want in expected.items())
    passing = sum(passes(s) for s in range(len(sampled)))
    kept = len(tests) >= max(cfg.min_valid_cases, 1) and passing >= cfg.min_pass
    return ProblemTests(tests, kept, len(inputs), passing, len(sampled), agreement)
