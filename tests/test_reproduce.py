"""experiments/reproduce: each RL arm differs from the base run in its one setting only, and the
--quick command runs every arm and model on the real engine and writes every table and picture
(its assertions are that it runs and reports, not that the findings hold at toy size)."""

import dataclasses
import json
import subprocess
import sys

import pytest

from experiments import reproduce
from k15jax.run import run_config

FINDINGS = ("F1", "F2", "F3", "F4", "F5", "F6", "F7", "P")


def _differences(a, b, prefix=""):
    """Returns the dotted names of the leaves where dataclasses a and b differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += _differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}")
    return sorted(out)


def test_each_arm_changes_only_its_own_setting():
    base = run_config.RunConfig()
    changed = {name: _differences(base, arm) for name, arm in reproduce.arms(base).items()}
    assert changed == {
        "rest": ["rl.objective"],
        # both unprioritized; the curriculum keeps the run's, uniform drops it
        "curriculum": ["sampler.prioritized"],
        "uniform": [
            "sampler.curriculum_iterations", "sampler.hard_threshold", "sampler.prioritized",
        ],
        "no_length_penalty": ["length.weight"],
        "partial": ["partial.budget"],
    }  # fmt: skip
    arms = reproduce.arms(base)
    assert base.sampler.curriculum_iterations > 0 and base.sampler.order == "easy_first"
    assert arms["uniform"].sampler.curriculum_iterations == 0
    assert arms["partial"].partial.budget == base.partial.max_length // 2 < base.partial.budget


def test_the_quick_setting_is_small_and_keeps_the_arms_valid():
    quick = reproduce.quick_config(run_config.RunConfig())
    assert quick.rl.iterations <= 3 and quick.eval.problems <= 16 and quick.sft.steps <= 8
    assert set(reproduce.arms(quick)) == {
        "rest", "curriculum", "uniform", "no_length_penalty", "partial",
    }  # fmt: skip


def test_a_base_arm_that_is_already_partial_is_refused(tmp_path):
    # The partial-rollout finding compares whole responses (the base) with half the budget: a
    # base run with --budget below --max_length would compare the wrong way round.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", f"--out_dir={tmp_path / 'r'}",
         "--budget=20", "--max_length=40"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "--budget=20 must equal --max_length=40" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.reproduce
def test_quick_reproduction_writes_every_finding(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "experiments.reproduce", "--quick", f"--out_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0] and [f["key"] for f in result["findings"]] == list(FINDINGS)
    text = (out / "report.md").read_text()
    for f in result["findings"]:
        # one seed gives no interval over seeds: every verdict is inconclusive by the rule
        assert f["verdict"] == "inconclusive", f
        assert f["quantities"] and all(len(q["per_seed"]) == 1 for q in f["quantities"])
        assert (out / f["picture"]).stat().st_size > 1000
        assert f"## {f['key']}: " in text and f"![{f['key']}]({f['picture']})" in text
    for arm in ("base", "rest", "curriculum", "uniform", "no_length_penalty", "partial"):
        assert (out / "seed0" / arm / "rl_model" / "config.json").exists(), arm
    budgets = json.loads((out / "seed0" / "budgets.json").read_text())
    assert set(budgets) == {"SFT (long traces)", "RL", "SFT (direct answers)"}
    # 8 tokens cannot hold a trace and its answer: every sample is cut and scores 0
    assert all(budgets[m]["8"]["pass_at_1"] == 0.0 for m in budgets)
    assert "long2short RL" in text and "merge" in text
    # a rerun reads every finished arm and model back: the same report, nothing trained again
    model = out / "seed0" / "rest" / "rl_model" / "model.safetensors"
    before = model.stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model.stat().st_mtime_ns == before
    assert (out / "report.md").read_text() == text
    assert "no engine started" in proc.stdout  # nothing to sample: the engine stays down
