"""The long-CoT SFT warm-up phase (k1.5 §0): masked cross-entropy on solver traces, resumable.

`run_sft(setup, progress)` is the run's first phase (`loop`) and the warm-up of the scripts that
train a model alone (`experiments.sft`, `task_study`, `long2short`, `judge`).
"""

from __future__ import annotations

import os

from k15jax.infra import distributed
from k15jax.model import decoder, sharding
from k15jax.run import run_state
from k15jax.run.run_setup import Setup
from k15jax.train import sft, train_step, update


def run_sft(setup: Setup, progress) -> tuple[decoder.Params, list[dict]]:
    """Long-CoT warm-up: masked cross-entropy on solver traces; returns (params, history)."""
    cfg = setup.cfg
    examples = sft.tokenize(
        setup.problems.sft_traces,
        setup.tok.encode,
        setup.tok.eos_id,
        encode_prompt=setup.encode_prompt,
    )
    if cfg.sft.steps == 0 or not examples:
        return distributed.host_value(setup.params), []
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "sft")
    trainer = train_step.make_trainer(
        setup.model_cfg, sft.optimizer(cfg.sft), sft.STEP_CONFIG, setup.mesh
    )
    fresh = train_step.init_state(setup.params, setup.model_cfg, trainer.optimizer, setup.mesh)
    restored = run_state.restore_latest(ckpt_dir, run_state.SftState, fresh)
    state, start = restored or (run_state.SftState(fresh), 0)
    bar = progress(total=cfg.sft.steps, initial=start, desc="SFT")
    shards = sharding.batch_shards(trainer.mesh)
    batches = (
        sft.batch(
            examples,
            step=i,
            seed=cfg.seed,
            batch_size=cfg.sft.batch_size,
            seq_len=cfg.seq_len,
            multiple=shards,
        )
        for i in range(start, cfg.sft.steps)
    )
    steps = update.run_steps(trainer, state.train, batches, where="SFT", start=start)
    for i, (train, m) in enumerate(steps, start):
        entry = {"step": i, "loss": m["loss"], "train_tokens_per_s": m["tokens"] / m["seconds"]}
        state = run_state.SftState(train, (*state.history, entry))
        # refresh=False: the bar redraws at its own interval, not once a step (a log file
        # would otherwise get a line per step)
        bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
        bar.update(1)
        if (i + 1) % cfg.sft.checkpoint_every == 0 or i + 1 == cfg.sft.steps:
            run_state.save(ckpt_dir, i + 1, state)
    bar.close()
    return distributed.host_value(state.train.params), list(state.history)
