"""The RL loop with the JAX sampler (`engines.FakeEngine`): what needs the loop but not vLLM."""

import dataclasses
import math
import os

import jax
import optax

from k15jax.data import prompt_sets
from k15jax.infra import distributed
from k15jax.rollout import engines, partial
from k15jax.run import evaluation, loop, run_config, run_state
from k15jax.train import sft, train_step, update

TINY = dataclasses.replace(
    run_config.RunConfig(),
    task=prompt_sets.TaskConfig(
        train_problems=8, sft_examples=8, max_terms=3, max_prompt_tokens=24
    ),
    sft=sft.SftConfig(steps=0),
    rl=run_config.RlConfig(
        iterations=2,
        prompts_per_iteration=8,
        samples_per_prompt=2,
        groups_per_step=4,  # 8 rows a step: whole shards of the 8 test devices
        difficulty_samples=1,
        easy_to_hack_tries=0,
        checkpoint_every=1,
        eval_every=0,
    ),
    eval=evaluation.EvalConfig(problems=8, samples=2),
    # budget = max_length: every sample ends in the iteration that starts it, so each
    # iteration trains on all its groups (8 groups, 4 per step: 2 optimizer steps).
    partial=partial.PartialConfig(budget=8, max_length=8),
)


class _NoBar:
    def __init__(self, **kw):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _adam_counts(opt_state) -> list[int]:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]


def test_the_optimizer_is_reset_at_every_rl_iteration(tmp_path):
    # k1.5 §2.3.2 resets the optimizer at the start of each iteration: the Adam state the last
    # checkpoint holds has counted the last iteration's steps only, while the trainer's step
    # counts them all.
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path / "run"))
    setup = loop.prepare(cfg)
    params = distributed.host_value(setup.params)
    engine = engines.FakeEngine(setup.model_cfg, params, eos_id=setup.tok.eos_id)
    _, history = loop.run_rl(setup, engine, params, _NoBar, lambda line: None)
    steps = [m["optimizer_steps"] for m in history]
    assert steps == [2, 2], history
    optimizer = train_step.make_optimizer(cfg.rl.learning_rate, max_grad_norm=cfg.rl.max_grad_norm)
    target = train_step.init_state(setup.params, setup.model_cfg, optimizer, setup.mesh)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "rl")
    state, step = run_state.restore_latest(ckpt_dir, run_state.RlState, target)
    assert step == 2
    assert int(state.train.step) == 4  # both iterations' steps
    assert _adam_counts(state.train.opt_state) == [2]  # the last iteration's only, not 4


def test_an_rl_run_with_the_rest_objective_writes_the_usual_history(tmp_path):
    # The Fig. 10 baseline through the whole RL loop: rollouts, the reference, packed steps.
    # The untrained model answers nothing right, so no sample is kept (loss 0): this checks the
    # plumbing; the numerics of kept samples are tests/test_rest.py's.
    rl = dataclasses.replace(TINY.rl, objective="rest")
    cfg = dataclasses.replace(TINY, out_dir=str(tmp_path / "run"), rl=rl)
    setup = loop.prepare(cfg)
    params = distributed.host_value(setup.params)
    engine = engines.FakeEngine(setup.model_cfg, params, eos_id=setup.tok.eos_id)
    lines = []
    _, history = loop.run_rl(setup, engine, params, _NoBar, lines.append)
    assert [m["optimizer_steps"] for m in history] == [2, 2], history
    assert len([x for x in lines if x.startswith("it ")]) == 2  # it reads the step metrics
    for m in history:
        for key in (*update.STEP_METRICS, "logprob_mismatch_mean", "reward"):
            assert key in m and math.isfinite(m[key]), (key, m)
    optimizer = cfg.rl.optimizer()
    target = train_step.init_state(setup.params, setup.model_cfg, optimizer, setup.mesh)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "rl")
    state, step = run_state.restore_latest(ckpt_dir, run_state.RlState, target)
    assert step == 2 and [h["iteration"] for h in state.history] == [0, 1]
