"""The GPU check's own code at toy sizes on CPU, so a lent GPU's minutes are not spent on a
crash in the check: the train-step case in a fresh process (plan next to a real step) and three
RL iterations with the JAX sampler."""

import json
import os
import subprocess
import sys


def test_gpu_check_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.checks.gpu_check", "--smoke", f"--out={tmp_path}",
         "--parts=step,rl"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.load(open(tmp_path / "gpu_check.json"))
    by_part = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    steps = by_part["train step 0.5B"]  # a failed case would be a row of part "train step"
    assert [r["t"] for r in steps] == [256, 512]
    for r in steps:
        assert r["finite"] and r["step_s"] > 0
        assert r["plan_total"] >= r["plan_state"] + r["plan_temp"] > 0
        assert r["peak"] is None  # CPU devices report no memory statistics
    # The plan grows with the tokens of the step.
    assert steps[1]["plan_temp"] > steps[0]["plan_temp"]
    rl = by_part["RL (JAX sampler)"]
    assert [r["case"] for r in rl] == ["setup + difficulty"] + [f"iteration {i}" for i in range(3)]
    assert all("pending" in r["result"] for r in rl[1:])
    table = open(tmp_path / "gpu_check.md").read()
    assert table.startswith("| part | case | result | s |") and table.count("\n") == len(rows) + 2
