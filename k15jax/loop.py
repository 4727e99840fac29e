"""The k1.5 run: long-CoT SFT warm-up -> mirror-descent RL with vLLM rollouts -> evaluation.

One short function per phase; `run(cfg)` composes them. Everything that changes across steps is
one run-state value (`run_state.SftState`, `run_state.RlState`) and is the whole checkpoint;
every random choice derives from (seed, phase, step), so a run killed at any moment and started
again with the same command continues from its last checkpoint and ends with the same params as
an uninterrupted run (on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import jax

from k15jax import (
    atomic,
    convert,
    data,
    difficulty,
    model,
    partial,
    report,
    rollout,
    run_state,
    sampler,
    scoring,
    sft,
    train_step,
)
from k15jax.rewards import sandbox as sandbox_lib
from k15jax.run_config import RunConfig, as_json, check_out_dir
from k15jax.run_setup import Setup, evaluate, prepare

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- SFT


def run_sft(setup: Setup, progress) -> tuple[model.Params, list[dict]]:
    """Long-CoT warm-up: masked cross-entropy on solver traces; returns (params, history)."""
    cfg = setup.cfg
    examples = sft.tokenize(setup.problems.sft_traces, setup.tok.encode, setup.tok.eos_id)
    if cfg.sft.steps == 0 or not examples:
        return setup.params, []
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "sft")
    step_cfg = train_step.StepConfig(objective="sft", group_size=1)
    trainer = train_step.make_trainer(setup.model_cfg, sft.optimizer(cfg.sft), step_cfg, setup.mesh)
    fresh = train_step.init_state(setup.params, setup.model_cfg, trainer.optimizer, setup.mesh)
    restored = run_state.restore_latest(ckpt_dir, run_state.SftState, fresh)
    state, start = restored or (run_state.SftState(fresh), 0)
    bar = progress(total=cfg.sft.steps, initial=start, desc="SFT")
    for i in range(start, cfg.sft.steps):
        batch = sft.batch(
            examples, step=i, seed=cfg.seed, batch_size=cfg.sft.batch_size, seq_len=cfg.seq_len
        )
        t0 = time.perf_counter()
        train, m = train_step.checked_step(trainer, state.train, batch, where=f"SFT step {i}")
        tokens_per_s = float(batch.segment_ids_bt.sum()) / (time.perf_counter() - t0)
        entry = {"step": i, "loss": m["loss"], "train_tokens_per_s": tokens_per_s}
        state = run_state.SftState(train, (*state.history, entry))
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if (i + 1) % cfg.sft.checkpoint_every == 0 or i + 1 == cfg.sft.steps:
            run_state.save(ckpt_dir, i + 1, state)
    bar.close()
    return jax.device_get(state.train.params), list(state.history)


# ---------------------------------------------------------------------------------- RL


def start_rl(setup: Setup, engine, train: train_step.TrainState, console) -> run_state.RlState:
    """Returns the RL state before iteration 0: the SFT model's pass rates, the problems kept."""
    cfg = setup.cfg
    pool = setup.problems.train
    rates = difficulty.pass_rates(
        engine,
        pool,
        setup.scorer,
        setup.encode_prompt,
        n=cfg.rl.difficulty_samples,
        temperature=1.0,
        max_tokens=cfg.partial.max_length,
        seed=cfg.seed,
    )
    if cfg.rl.drop_solved:
        pool, rates = difficulty.filter_problems(pool, rates)
    console(f"difficulty: {len(pool)} problems kept, mean SFT pass rate {rates.mean():.3f}")
    return run_state.RlState(
        train=train,
        sampler=sampler.init_state(rates, seed=cfg.seed),
        buffer=partial.ReplayBuffer(),
        history=(),
        train_ids=tuple(p.id for p in pool),
    )


def rl_iteration(
    setup: Setup,
    engine,
    trainer: train_step.Trainer,
    state: run_state.RlState,
    pool: tuple[data.Problem, ...],
    iteration: int,
) -> tuple[run_state.RlState, dict]:
    """Runs one k1.5 iteration (spec §11) on the problems `pool`; returns (state, metrics)."""
    t0 = time.perf_counter()
    state, groups, metrics = _rollout(setup, engine, state, pool, iteration)
    if not groups:
        return state, metrics
    rewards, correct, stats = scoring.score_groups(
        groups, pool, setup.scorer, iteration=iteration, length=setup.cfg.length
    )
    problems = [s.problem for g in groups for s in g.samples]
    success = sampler.update(state.sampler, problems, correct.astype(float))
    train, train_metrics = _train(setup, trainer, state.train, groups, rewards, iteration)
    engine.load_weights(jax.device_get(train.params))
    metrics = {**metrics, **stats, **train_metrics, "seconds": time.perf_counter() - t0}
    return dataclasses.replace(state, train=train, sampler=success), metrics


def _rollout(setup: Setup, engine, state: run_state.RlState, pool, iteration: int):
    """Draws this iteration's prompts and generates; returns (state, finished groups, metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    t0 = time.perf_counter()
    drawn, drawn_state = sampler.draw(
        state.sampler, cfg.sampler, iteration, rl.prompts_per_iteration
    )
    new = [(int(i), setup.prompt_ids(pool[i])) for i in drawn]
    spec = rollout.SamplingSpec(
        n=rl.samples_per_prompt, temperature=rl.temperature, repeat=cfg.repeat
    )
    groups, buffer, rstats = partial.rollout(
        engine, state.buffer, new, spec, cfg.partial,
        iteration=iteration, seed=cfg.seed * 100_003 + iteration,
    )  # fmt: skip
    metrics = {
        "iteration": iteration,
        "rollout_tokens_per_s": rstats["new_tokens"] / (time.perf_counter() - t0),
        "pending_samples": rstats["pending_samples"],
        "finished_groups": len(groups),
        "resumed": rstats["resumed"],
    }
    return dataclasses.replace(state, sampler=drawn_state, buffer=buffer), groups, metrics


def _train(setup: Setup, trainer, train, groups, rewards, iteration: int):
    """The mirror-descent update on finished `groups`; returns (train state, metrics)."""
    cfg = setup.cfg
    packed = partial.pack(
        groups, iteration=iteration, loss_segments=cfg.partial.loss_segments, pad_to=cfg.seq_len
    )
    rows = cfg.rl.rows_per_step
    # π_{θ_i}: recomputed by the trainer, not trusted from the engine.
    ref = train_step.reference_logprobs(
        trainer, train.params, packed.tokens_bt, packed.segment_ids_bt, rows=rows
    )
    metrics = partial.logprob_mismatch(packed.rollout_logp_bt, ref, packed.current_mask_bt)
    batch = train_step.Batch.for_rl(
        packed.tokens_bt, packed.mask_bt, ref, rewards, packed.segment_ids_bt
    )
    t0 = time.perf_counter()
    train, steps = train_step.iteration_update(
        trainer, train, batch, rows=rows, where=f"RL iteration {iteration}"
    )
    tokens_per_s = float(packed.segment_ids_bt.sum()) / (time.perf_counter() - t0)
    return train, {**metrics, **report.mean_step_metrics(steps), "train_tokens_per_s": tokens_per_s}


def run_rl(setup: Setup, engine, params, progress, console) -> tuple[model.Params, list[dict]]:
    """Mirror-descent RL from `params`; returns (final params, per-iteration metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "rl")
    optimizer = train_step.make_optimizer(rl.learning_rate, max_grad_norm=rl.max_grad_norm)
    step_cfg = train_step.StepConfig(
        tau=rl.tau, group_size=rl.samples_per_prompt, micro_batches=rl.micro_batches
    )
    trainer = train_step.make_trainer(setup.model_cfg, optimizer, step_cfg, setup.mesh)
    fresh = train_step.init_state(params, setup.model_cfg, optimizer, setup.mesh)
    if restored := run_state.restore_latest(ckpt_dir, run_state.RlState, fresh):
        state, start = restored
        engine.load_weights(jax.device_get(state.train.params))
        log.info("resumed RL at iteration %d", start)
    else:
        state, start = start_rl(setup, engine, fresh, console), 0
        run_state.save(ckpt_dir, 0, state)
    pool = data.select(setup.problems.train, state.train_ids)
    bar = progress(total=rl.iterations, initial=start, desc="RL")
    for it in range(start, rl.iterations):
        state, m = rl_iteration(setup, engine, trainer, state, pool, it)
        if rl.eval_every and (it + 1) % rl.eval_every == 0 and it + 1 < rl.iterations:
            m["heldout_pass_at_1"] = evaluate(setup, engine)["pass_at_1"]
        state = dataclasses.replace(state, history=(*state.history, m))
        bar.update(1)
        console(report.iteration_line(m))
        if (it + 1) % rl.checkpoint_every == 0 or it + 1 == rl.iterations:
            run_state.save(ckpt_dir, it + 1, state)
    bar.close()
    return jax.device_get(state.train.params), list(state.history)


# ----------------------------------------------------------------------------------- run


def _sft_and_rl(setup: Setup, engine, progress, console) -> tuple[model.Params, list, list, dict]:
    """Runs SFT, its evaluation, RL and its evaluation; returns (params, histories, results)."""
    cfg = setup.cfg
    params, sft_history = run_sft(setup, progress)
    hf_dir = convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "sft_model"), tokenizer=setup.tok
    )
    with contextlib.ExitStack() as stack:
        if engine is None:
            publish = os.path.join(cfg.vllm.publish_dir, f"run-{os.getpid()}")
            engine = rollout.VllmEngine(hf_dir, dataclasses.replace(cfg.vllm, publish_dir=publish))
            stack.callback(engine.close)
        else:
            engine.load_weights(params)
        results = {"sft": atomic.json_once(os.path.join(cfg.out_dir, "eval_sft.json"),
                                     lambda: evaluate(setup, engine))}  # fmt: skip
        console(report.eval_line("SFT", results["sft"]))
        params, rl_history = run_rl(setup, engine, params, progress, console)
        engine.load_weights(params)
        results["rl"] = atomic.json_once(
            os.path.join(cfg.out_dir, "eval_rl.json"), lambda: evaluate(setup, engine)
        )
    console(report.eval_line("RL ", results["rl"]))
    return params, sft_history, rl_history, results


def run(cfg: RunConfig, *, engine=None, progress=None, console=print) -> dict:
    """Runs SFT warm-up, evaluation, RL and evaluation; writes the report; returns results.

    Args:
      cfg: the run.
      engine: a running `RolloutEngine` for this model shape to reuse (its weights are
        replaced); by default a `VllmEngine` is started on the SFT model and closed at the end.
      progress: tqdm-like progress-bar factory.
      console: receives the one-line summaries.
    """
    from tqdm import tqdm

    progress = progress or (lambda **kw: tqdm(**kw, leave=False))
    t_start = time.perf_counter()
    check_out_dir(cfg)
    with contextlib.ExitStack() as stack:
        box = None
        if cfg.task.reward == "code":
            box = stack.enter_context(sandbox_lib.Sandbox(cfg.sandbox))
        setup = prepare(cfg, sandbox=box)
        n_params = sum(x.size for x in jax.tree.leaves(setup.params))
        console(
            f"model {setup.model_cfg.architecture} with {n_params:,} parameters; "
            f"{len(setup.problems.train)} RL problems, {len(setup.problems.held_out)} held-out"
        )
        params, sft_history, rl_history, results = _sft_and_rl(setup, engine, progress, console)
    convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "rl_model"), tokenizer=setup.tok
    )
    results.update(wall_seconds=time.perf_counter() - t_start, parameters=n_params)
    report.write(cfg.out_dir, as_json(cfg), sft_history, rl_history, results)
    console(f"report: {os.path.join(cfg.out_dir, 'report.md')}")
    return {**results, "params": params}
