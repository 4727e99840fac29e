"""The main job: long-CoT SFT warm-up -> mirror-descent RL with vLLM rollouts -> evaluation.

  python -m experiments.rl                       # built-in task and tiny model (`make run`)
  python -m experiments.rl --seed=1              # the same run on other problems and weights
  python -m experiments.rl --out_dir=runs/x --iterations=60 --tau=0.05
  python -m experiments.rl --max_digits=4 --max_length=256 --out_dir=runs/d4   # a harder level
  python -m experiments.rl --model=/models/Qwen2.5-0.5B-Instruct \\
      --data=../shared/data/gsm8k_train.jsonl --reward=math --sft_steps=0 \\
      --samples_per_prompt=16 --budget=2048 --max_length=8192 --tau=0.01 --learning_rate=1e-6 \\
      --attention_impl=xla_chunked --logprob_impl=xla_chunked --remat   # O(t) trainer memory
  python -m experiments.rl -v 1                  # vLLM and JAX INFO lines too (default: warnings)

The built-in task is column addition of two 2-3 digit numbers (`--task_family=columns`), where
the solver's long trace wins over a direct answer. On 2 CPU cores the default takes about 9
minutes and writes runs/default/report.md with held-out pass@1 of the SFT and RL models, their
95% intervals over problems, and a sentence saying what this seed showed; BUILD.md gives seeds
0, 1 and 2 and the command that reproduces them. `--seed` changes every random choice.
Re-running the same command after an interruption resumes from the last checkpoint. A mistake in
flags, prompt files or the run directory ends it with one line on stderr and exit status 2.
"""

from __future__ import annotations

from absl import app

from experiments import run_flags  # defines the flags
from k15jax.infra import distributed
from k15jax.run import loop


def main(argv):
    run_flags.colocated_memory()  # before JAX creates its GPU client
    distributed.initialize(run_flags.distributed_config())  # before anything touches a device
    try:
        cfg = run_flags.config_from_argv(argv)
    except ValueError as e:
        run_flags.fail(e)
    try:
        results = loop.run(cfg)
    except run_flags.USER_ERRORS as e:
        run_flags.fail(e)
    if not distributed.is_main():
        return
    sft, rl = results["sft"], results["rl"]
    print(
        f"done in {results['wall_seconds']:.0f}s, seed {cfg.seed}: held-out pass@1 SFT "
        f"{sft['pass_at_1']:.3f} {_interval(sft)} -> RL {rl['pass_at_1']:.3f} {_interval(rl)}; "
        f"mean length {sft['mean_length']:.0f} -> {rl['mean_length']:.0f}"
    )


def _interval(result: dict) -> str:
    return f"[{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}]"


if __name__ == "__main__":
    app.run(main)
