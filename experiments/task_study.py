"""Does thinking longer pay on the built-in task? Direct vs long-CoT warm-up, over seeds.

  python -m experiments.task_study --out_dir=runs/task_study --seeds=0,1,2 \\
      --budgets=16,32,64,128,256

For each seed, two models of the same size are warmed up with the same SFT steps: one on the
solver's direct answers ("answer: n", `--short_fraction=1`), one on its long traces. Each is
then sampled on the seed's held-out problems at every response budget in `--budgets` (vLLM's
`max_tokens`; a trace cut before its answer scores 0). The report gives pass@1 per arm and
budget (per seed, mean and 95% interval over seeds), pass@1 and trace length per difficulty
level, and the verdict by the rule fixed before any run: long traces win if, at the largest
budget, their interval over seeds lies wholly above the direct answers'.

Every other flag is experiments/rl.py's (task sizes, SFT steps, engine knobs, --temperature).
Writes `<out_dir>/task_study.json` and `<out_dir>/task_study.md`; each arm's model stays in
`<out_dir>/<arm>_seed<s>/sft_model`, so a rerun skips the SFT of an arm it already trained.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import app, flags

from experiments import run_flags  # the run flags are this script's flags too
from k15jax.data import tasks
from k15jax.infra import atomic
from k15jax.model import convert
from k15jax.rollout import engines
from k15jax.run import evaluation, findings, report, run_config, run_setup, warmup

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, fixed before the runs.")
_BUDGETS = flags.DEFINE_list("budgets", ["16", "32", "64", "128", "256"], "max_tokens budgets.")
_ARMS = {"direct": 1.0, "long": 0.0}  # arm -> fraction of warm-up traces that answer directly


def by_level(problems, result) -> dict[str, dict]:
    """Returns {level: {"pass_at_1", "problems"}} from one `evaluation.evaluate` result."""
    levels: dict[str, list[float]] = {}
    for p, c in zip(problems, result["correct"], strict=True):
        levels.setdefault(str(int(p.difficulty)), []).append(c / result["samples"])
    return {
        k: {"pass_at_1": float(np.mean(v)), "problems": len(v)}
        for k, v in sorted(levels.items(), key=lambda kv: int(kv[0]))
    }


def trace_lengths(cfg: run_config.RunConfig, n: int = 2000) -> dict[str, float]:
    """Returns {level: mean token count of the solver's long trace, eos included}."""
    t = cfg.task
    examples = tasks.generate(
        n, seed=0, unique=False, family=t.family, min_terms=t.min_terms, max_terms=t.max_terms,
        max_term=t.max_term, min_digits=t.min_digits, max_digits=t.max_digits,
    )  # fmt: skip
    by: dict[str, list[int]] = {}
    for e in examples:  # the built-in tokenizer: one token per character
        by.setdefault(str(e.difficulty), []).append(len(e.long_trace) + 1)
    return {k: float(np.mean(v)) for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))}


def run_arm(cfg: run_config.RunConfig, budgets: list[int]) -> dict:
    """SFT (or its saved model) then held-out pass@1 at each budget; returns the arm's result.

    The arm's directory is a run directory: one trained with other settings is refused.
    """
    run_config.check_out_dir(cfg)
    setup = run_setup.prepare(cfg)
    model_dir = os.path.join(cfg.out_dir, "sft_model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        params, _ = warmup.run_sft(setup, progress=report.progress_bar)
        convert.save_hf(setup.model_cfg, params, model_dir, tokenizer=setup.tok)
    held = setup.problems.held_out
    prompts = [setup.prompt_ids(p) for p in held]
    engine = engines.VllmEngine(model_dir, run_config.engine_config(cfg))
    try:
        out = {}
        for b in budgets:
            r = evaluation.evaluate(
                engine, held, prompts, setup.scorer, cfg.eval,
                max_tokens=b, repeat=cfg.repeat, seed=cfg.seed + 1,
            )  # fmt: skip
            out[str(b)] = {
                "pass_at_1": r["pass_at_1"],
                "ci95": r["ci95"],
                "mean_length": r["mean_length"],
                "levels": by_level(held, r),
            }
    finally:
        engine.close()
    return out


def study(cfg: run_config.RunConfig, seeds: list[int], budgets: list[int]) -> dict:
    """Runs every (arm, seed) and returns per-seed results, intervals over seeds and verdict."""
    runs: dict[str, dict[str, dict]] = {arm: {} for arm in _ARMS}
    for s in seeds:
        for arm, short in _ARMS.items():
            arm_cfg = dataclasses.replace(
                cfg,
                seed=s,
                out_dir=os.path.join(cfg.out_dir, f"{arm}_seed{s}"),
                task=dataclasses.replace(cfg.task, short_fraction=short),
            )
            runs[arm][str(s)] = run_arm(arm_cfg, budgets)
    summary = {
        arm: {
            str(b): findings.interval([runs[arm][str(s)][str(b)]["pass_at_1"] for s in seeds])
            for b in budgets
        }
        for arm in _ARMS
    }
    top = str(max(budgets))
    _, _, direct_high = summary["direct"][top]
    _, long_low, _ = summary["long"][top]
    return {
        "seeds": seeds,
        "budgets": budgets,
        "runs": runs,
        "summary": summary,
        "long_wins": bool(long_low > direct_high),
    }


def markdown(result: dict, lengths: dict[str, float]) -> str:
    seeds, budgets = result["seeds"], result["budgets"]
    lines = [
        "# Does thinking longer pay? Direct vs long-CoT warm-up on the built-in task",
        "",
        f"Seeds {seeds} (fixed before the runs); pass@1 on each seed's held-out problems.",
        "",
        "| arm | budget (tokens) | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean [95% interval over seeds] | mean length |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]  # fmt: skip
    for arm in _ARMS:
        for b in budgets:
            per = [result["runs"][arm][str(s)][str(b)] for s in seeds]
            m, lo, hi = result["summary"][arm][str(b)]
            length = np.mean([p["mean_length"] for p in per])
            cells = " | ".join(f"{p['pass_at_1']:.3f}" for p in per)
            lines.append(f"| {arm} | {b} | {cells} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {length:.1f} |")
    top = str(max(budgets))
    levels = sorted(result["runs"]["long"][str(seeds[0])][top]["levels"], key=int)
    lines += [
        "",
        f"Per difficulty level at budget {top} (mean over seeds), with the solver's trace length:",
        "",
        "| level | direct pass@1 | long pass@1 | long trace tokens (solver) |",
        "|---|---|---|---|",
    ]
    for lv in levels:
        cell = {
            arm: np.mean([result["runs"][arm][str(s)][top]["levels"][lv]["pass_at_1"]
                          for s in seeds])
            for arm in _ARMS
        }  # fmt: skip
        solver = lengths.get(lv, float("nan"))
        lines.append(f"| {lv} | {cell['direct']:.3f} | {cell['long']:.3f} | {solver:.0f} |")
    verdict = "holds" if result["long_wins"] else "does not hold"
    lines += [
        "",
        f"Long traces beat direct answers (long's interval over seeds wholly above direct's at "
        f"budget {top}): **{verdict}**.",
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    try:
        cfg = run_flags.config_from_argv(argv)
    except ValueError as e:
        run_flags.fail(e)
    seeds = [int(s) for s in _SEEDS.value]
    budgets = sorted({int(b) for b in _BUDGETS.value})
    if not seeds or not budgets or min(budgets) < 1 or max(budgets) > cfg.partial.max_length:
        raise app.UsageError(
            f"--seeds and --budgets must be non-empty, budgets in [1, --max_length="
            f"{cfg.partial.max_length}]; got {_SEEDS.value}, {_BUDGETS.value}"
        )
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        result = study(cfg, seeds, budgets)
    except run_flags.USER_ERRORS as e:
        run_flags.fail(e)
    lengths = trace_lengths(cfg)
    result["solver_trace_tokens"] = lengths
    text = markdown(result, lengths)
    atomic.write_json(os.path.join(cfg.out_dir, "task_study.json"), result)
    atomic.write_text(os.path.join(cfg.out_dir, "task_study.md"), text)
    print(text)


if __name__ == "__main__":
    app.run(main)
