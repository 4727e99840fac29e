"""pass@k, avg@k and maj@k of a Hugging Face model directory on JSONL sets, real vLLM engine.

  python -m experiments.eval --model=runs/default/rl_model --k=1,2,4 --samples=4   # built-in task
  python -m experiments.eval --model=/models/qwen --reward=math --max_prompt_tokens=512 \\
      --data=math500.jsonl,gsm8k_test.jsonl --eval_problems=500 --samples=16 --k=1,4,16 \\
      --max_length=4096 --eval_out=runs/eval-qwen

Prints one table per data set (rows k; pass@k, avg@k, maj@k with 95% intervals over problems)
and, with --eval_out, writes eval.json and eval.md there. Sampling is seeded (--seed), so the
same command gives the same numbers. Each file is evaluated whole up to --eval_problems (no
held-out split); without --data, the built-in task's held-out set. Every other flag is
experiments/rl.py's (the prompt template, reward, lengths, engine knobs, --temperature).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from absl import app, flags

from experiments import run_flags  # the run flags are this script's flags too
from k15jax.data import prompt_sets
from k15jax.infra import atomic
from k15jax.rewards import sandbox
from k15jax.rollout import engines
from k15jax.run import evaluation, run_setup
from k15jax.run.run_config import RunConfig, engine_config

_SAMPLES = flags.DEFINE_integer("samples", 16, "Samples per problem (n of pass@k).")
_KS = flags.DEFINE_string("k", "1,4,16", "Comma-separated k of pass@k, avg@k and maj@k.")
_EVAL_OUT = flags.DEFINE_string(
    "eval_out", None, "Directory for eval.json and eval.md (default: print only)."
)


def parse_ks(text: str) -> tuple[int, ...]:
    """Returns the sorted distinct k of "1,4,16"; refuses anything but positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise app.UsageError(f"--k={text}: expected positive integers like 1,4,16")
    return tuple(sorted({int(p) for p in parts}))


def eval_config(cfg: RunConfig, *, samples: int, ks: tuple[int, ...]) -> evaluation.EvalConfig:
    """Returns the run's evaluation settings with `samples` per problem and `ks`."""
    if max(ks) > samples:
        raise app.UsageError(f"--k={','.join(map(str, ks))}: each k must be <= --samples={samples}")
    return dataclasses.replace(cfg.eval, samples=samples, ks=ks, temperature=cfg.rl.temperature)


def evaluate_sets(
    setup: run_setup.Setup,
    engine: engines.RolloutEngine,
    sets: dict[str, tuple[prompt_sets.Problem, ...]],
    cfg: evaluation.EvalConfig,
) -> dict[str, dict]:
    """Returns {set name: `evaluation.evaluate` result} with the run's prompts, scorer and seed."""
    run = setup.cfg
    return {
        name: evaluation.evaluate(
            engine,
            problems,
            [setup.prompt_ids(p) for p in problems],
            setup.scorer,
            cfg,
            max_tokens=run.partial.max_length,
            repeat=run.repeat,
            seed=run.seed + 1,  # the seed of the run's own held-out evaluation
        )
        for name, problems in sets.items()
    }


def markdown(results: dict[str, dict]) -> str:
    """Returns the tables of every set, in order."""
    return "\n".join(evaluation.markdown_table(name, r) for name, r in results.items())


def write(results: dict[str, dict], out_dir: str) -> None:
    """Writes eval.json and eval.md into `out_dir` (each replaced atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_json(os.path.join(out_dir, "eval.json"), results)
    atomic.write_text(os.path.join(out_dir, "eval.md"), markdown(results))


def main(argv):
    cfg = run_flags.config_from_argv(argv)
    if cfg.model_dir is None:
        raise app.UsageError("--model is required (a Hugging Face model directory)")
    files = [f.strip() for f in (cfg.task.data or "").split(",") if f.strip()]
    eval_cfg = eval_config(cfg, samples=_SAMPLES.value, ks=parse_ks(_KS.value))
    # Setup reads the first file (or builds the built-in task) for its tokenizer and scorer.
    cfg = dataclasses.replace(
        cfg, eval=eval_cfg, task=dataclasses.replace(cfg.task, data=files[0] if files else None)
    )
    with contextlib.ExitStack() as stack:
        box = None
        if cfg.task.reward == "code":
            box = stack.enter_context(sandbox.Sandbox(cfg.sandbox))
        setup = run_setup.prepare(cfg, sandbox=box)
        if files:
            sets = {
                os.path.basename(f): prompt_sets.load_jsonl(f)[: eval_cfg.problems] for f in files
            }
        else:
            sets = {"built-in held-out": setup.problems.held_out}
        engine = engines.VllmEngine(cfg.model_dir, engine_config(cfg))
        stack.callback(engine.close)
        results = evaluate_sets(setup, engine, sets, eval_cfg)
    print(markdown(results))
    if _EVAL_OUT.value:
        write(results, _EVAL_OUT.value)


if __name__ == "__main__":
    app.run(main)
