"""Held-out pass@1 of a Hugging Face model directory with the real vLLM engine.

  python -m experiments.eval --model=runs/default/rl_model                    # built-in task
  python -m experiments.eval --model=/models/qwen --data=../shared/data/math_train.jsonl \\
      --reward=math --eval_problems=500 --eval_samples=4 --max_length=4096

Prints pass@1 with its 95% interval (over problems) and the mean response length.
"""

from __future__ import annotations

import contextlib
import json

from absl import app

from experiments import rl as rl_script  # its flags are this script's flags too
from k15jax import loop, rollout
from k15jax.rewards import sandbox


def main(argv):
    cfg = rl_script.config_from_argv(argv)
    if cfg.model_dir is None:
        raise app.UsageError("--model is required (a Hugging Face model directory)")
    with contextlib.ExitStack() as stack:
        box = None
        if cfg.task.reward == "code":
            box = stack.enter_context(sandbox.Sandbox(cfg.sandbox))
        setup = loop.prepare(cfg, sandbox=box)
        engine = rollout.VllmEngine(cfg.model_dir, cfg.vllm)
        stack.callback(engine.close)
        result = loop.evaluate(setup, engine)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
