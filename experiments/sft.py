"""Long-CoT SFT warm-up alone: trains the built-in model on solver traces, writes a HF directory.

  python -m experiments.sft --out_dir=runs/sft --sft_steps=300

Expected on 2 CPU cores: ~3 minutes, final cross-entropy below 0.1 nats/token, and
runs/sft/sft_model loadable by transformers and vLLM. Resumes from its checkpoints.
"""

from __future__ import annotations

import os

from absl import app

from experiments import run_flags  # the run flags are this script's flags too
from k15jax.model import convert
from k15jax.run import loop, report, run_config, warmup


def main(argv):
    cfg = run_flags.config_from_argv(argv)
    run_config.check_out_dir(cfg)
    setup = loop.prepare(cfg)
    params, history = warmup.run_sft(setup, progress=report.progress_bar)
    path = convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "sft_model"), tokenizer=setup.tok
    )
    last = history[-1]["loss"] if history else float("nan")
    print(f"SFT done: {len(history)} steps, final loss {last:.4f}; model at {path}")


if __name__ == "__main__":
    app.run(main)
