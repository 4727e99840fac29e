"""Sandbox throughput: trivial programs judged per second, measured side by side.

  python -m experiments.benchmarks.sandbox_bench --programs=200

Judges `--programs` trivial stdin/stdout submissions (one test each) and as many assert-style
ones, with one worker and with the full pool (one per core), in the namespaces mode and in the
weaker rlimits-only mode (the cost of the namespaces). Function tests cost one more process
than stdin/stdout ones: the checker runs apart from the candidate. Each figure is the median of
--repeats; the table and a JSON (--out) report programs/s and the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

_PROGRAMS = flags.DEFINE_integer("programs", 200, "Programs per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measurements per case (median reported).")
_OUT = flags.DEFINE_string("out", "runs/sandbox_bench.json", "Where to write the results.")


def _rate(box, kind: str, n: int) -> float:
    from k15jax.rewards import code

    def one(i):
        if kind == "stdio":
            program = "print(sum(map(int, input().split())))\n"
            j = code.judge_stdio(box, program, [{"input": f"{i} 1", "output": f"{i + 1}"}])
        else:
            j = code.judge_function(
                box, "def f(x):\n    return x + 1\n", [f"assert f({i}) == {i + 1}"]
            )
        assert j.reward == 1.0, j
        return j

    start = time.perf_counter()
    box.map(one, range(n))
    return n / (time.perf_counter() - start)


def main(argv):
    del argv
    from k15jax.rewards import sandbox

    cores = os.cpu_count() or 1
    modes = ["namespaces"] if sandbox.check_isolation() is None else []
    modes.append("rlimits_only")
    results = {"cores": cores, "isolation": sandbox.check_isolation() or "available"}
    for mode in modes:
        for workers in sorted({1, cores}):
            cfg = sandbox.SandboxConfig(workers=workers, isolation=mode)
            with sandbox.Sandbox(cfg) as box:
                results[f"{mode}/limits"] = box.limits  # per run (cgroups) or per process
                for kind in ("stdio", "function"):
                    rates = [_rate(box, kind, _PROGRAMS.value) for _ in range(_REPEATS.value)]
                    results[f"{mode}/{kind}/workers={workers}"] = statistics.median(rates)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\ntrivial programs judged per second ({cores} cores, median of {_REPEATS.value}):")
    print("| mode | kind | 1 worker | pool | pool / 1 |")
    print("|---|---|---|---|---|")
    for mode in modes:
        print(f"{mode}: limits by {results[f'{mode}/limits']}")
    for mode in modes:
        for kind in ("stdio", "function"):
            one = results[f"{mode}/{kind}/workers=1"]
            pool = results[f"{mode}/{kind}/workers={cores}"]
            print(f"| {mode} | {kind} | {one:.1f} | {pool:.1f} | {pool / one:.2f} |")
    if len(modes) == 2:
        for kind in ("stdio", "function"):
            iso = results[f"namespaces/{kind}/workers={cores}"]
            weak = results[f"rlimits_only/{kind}/workers={cores}"]
            print(f"isolation cost, {kind}: rlimits-only / isolated = {weak / iso:.2f}x")


if __name__ == "__main__":
    app.run(main)
