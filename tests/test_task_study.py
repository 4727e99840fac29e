"""experiments/task_study: its per-level split and verdict, and one real
end-to-end run (SFT of both arms, vLLM-CPU sampling at two budgets, the report on disk)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import task_study
from k15jax.data import prompt_sets
from k15jax.run import findings


def test_by_level_averages_each_difficulty_apart():
    problems = [prompt_sets.Problem(str(i), f"Q:{i}\n", "1", difficulty=d)
                for i, d in enumerate([2, 2, 3])]  # fmt: skip
    levels = task_study.by_level(problems, {"correct": [4, 2, 0], "samples": 4})
    assert levels == {
        "2": {"pass_at_1": 0.75, "problems": 2},
        "3": {"pass_at_1": 0.0, "problems": 1},
    }


def _result(direct, long):
    runs = {arm: {str(s): {"8": {"pass_at_1": v, "mean_length": 1.0,
                                 "levels": {"2": {"pass_at_1": v, "problems": 1}}}}
                  for s, v in enumerate(vals)}
            for arm, vals in (("direct", direct), ("long", long))}  # fmt: skip
    summary = {arm: {"8": findings.interval(v)} for arm, v in (("direct", direct), ("long", long))}
    top_direct, top_long = summary["direct"]["8"], summary["long"]["8"]
    return {"seeds": [0, 1, 2], "budgets": [8], "runs": runs, "summary": summary,
            "long_wins": bool(top_long[1] > top_direct[2])}  # fmt: skip


def test_report_gives_every_seed_and_the_verdict_by_the_fixed_rule():
    apart = _result([0.01, 0.02, 0.0], [0.30, 0.25, 0.28])
    assert apart["long_wins"]
    text = task_study.markdown(apart, {"2": 40.0})
    assert "| long | 8 | 0.300 | 0.250 | 0.280 |" in text and "**holds**" in text
    overlap = _result([0.20, 0.30, 0.10], [0.35, 0.15, 0.40])  # long's mean higher, not apart
    assert not overlap["long_wins"]
    assert "**does not hold**" in task_study.markdown(overlap, {"2": 40.0})


@pytest.mark.slow
def test_study_runs_both_arms_on_the_real_engine_and_reuses_their_models(tmp_path):
    out = tmp_path / "study"
    cmd = [
        sys.executable, "-m", "experiments.task_study", f"--out_dir={out}", "--seeds=0,1",
        "--budgets=4,96", "--task_family=columns", "--min_digits=2", "--max_digits=2",
        "--sft_steps=40", "--sft_batch_size=8", "--sft_examples=64", "--train_problems=16",
        "--eval_problems=8", "--eval_samples=2", "--max_length=96", "--budget=96",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "task_study.json").read_text())
    assert result["seeds"] == [0, 1] and result["budgets"] == [4, 96]
    for arm in ("direct", "long"):
        for s in ("0", "1"):
            at = result["runs"][arm][s]
            # 4 tokens cannot hold "answer: <n>": every sample is cut before it and scores 0
            assert at["4"]["pass_at_1"] == 0.0 and at["4"]["mean_length"] <= 4
            assert 0.0 <= at["96"]["pass_at_1"] <= 1.0 and set(at["96"]["levels"]) == {"2"}
    # the direct arm learned to answer at once; the long arm to reason first
    assert result["runs"]["direct"]["0"]["96"]["mean_length"] < 20
    assert result["runs"]["long"]["0"]["96"]["mean_length"] > 40
    assert result["solver_trace_tokens"]["2"] > 50
    text = (out / "task_study.md").read_text()
    assert "| direct | 96 |" in text and "| long | 4 |" in text
    # a second run finds each arm's model and trains nothing again
    model = out / "long_seed1" / "sft_model" / "model.safetensors"
    before = os.stat(model).st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.stat(model).st_mtime_ns == before
    assert json.loads((out / "task_study.json").read_text())["runs"] == result["runs"]
    # other SFT settings do not pick up a model trained with these: the directory is refused
    proc = subprocess.run([*cmd, "--sft_steps=41"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "direct_seed0" in proc.stderr
