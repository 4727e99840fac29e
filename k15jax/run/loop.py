"""The k1.5 run: long-CoT SFT warm-up -> mirror-descent RL with vLLM rollouts -> evaluation.

One short function per phase (the SFT warm-up is `warmup.run_sft`); `run(cfg)` composes them.
Everything that changes across steps is one run-state value (`run_state.SftState`,
`run_state.RlState`) and is the whole checkpoint; every random choice derives from (seed,
phase, step), so a run killed at any moment and started again with the same command continues
from its last checkpoint and ends with the same params as an uninterrupted run (on CPU).

On several processes (`distributed`) every process runs every function here; process 0 alone
rolls out, scores, samples prompts, evaluates and writes files other than checkpoints, and what it
decides reaches the others through `distributed.from_main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import jax
import numpy as np

from k15jax.data import prompt_sets, sampler
from k15jax.infra import atomic, distributed
from k15jax.model import convert, decoder, sharding
from k15jax.rewards import sandbox as sandbox_lib
from k15jax.rewards import scoring
from k15jax.rollout import engines, partial, servers
from k15jax.run import difficulty, report, run_config, run_setup, run_state, warmup
from k15jax.run.run_config import RunConfig, as_json
from k15jax.run.run_setup import Setup, evaluate, prepare
from k15jax.train import train_step, update

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- RL


def start_rl(setup: Setup, engine, train: train_step.TrainState, console) -> run_state.RlState:
    """Returns the RL state before iteration 0: the SFT model's pass rates, the problems kept."""
    cfg = setup.cfg

    def decide():  # process 0; a run restarted before its first RL checkpoint reads the file
        path = os.path.join(cfg.out_dir, "difficulty.json")
        chosen = atomic.json_once(path, lambda: difficulty.select_problems(setup, engine))
        console(difficulty.pool_line(chosen))
        return {"rates": np.asarray(chosen["rates"])}, {"train_ids": chosen["train_ids"]}

    arrays, meta = distributed.from_main(decide)
    labels = [p.difficulty for p in prompt_sets.select(setup.problems.train, meta["train_ids"])]
    return run_state.RlState(
        train=train,
        sampler=sampler.init_state(arrays["rates"], seed=cfg.seed, labels=labels),
        buffer=partial.ReplayBuffer(),
        history=(),
        train_ids=tuple(meta["train_ids"]),
    )


def rl_iteration(
    setup: Setup,
    engine,
    trainer: train_step.Trainer,
    state: run_state.RlState,
    pool: tuple[prompt_sets.Problem, ...],
    iteration: int,
    grader: scoring.Grader | None = None,
) -> tuple[run_state.RlState, dict]:
    """Runs one k1.5 iteration (spec §11) on the problems `pool`; returns (state, metrics).

    `grader` (process 0): a judge model gives the task rewards (`scoring.Grader`)."""
    t0 = time.perf_counter()

    def decide():  # process 0: prompts, rollouts, rewards, sampler update, packed batch
        drawn, groups, metrics = _rollout(setup, engine, state, pool, iteration)
        engine.sleep()  # a colocated engine frees the device while the trainer runs
        t_score = time.perf_counter()
        arrays = {}
        if groups:
            drawn, samples, stats = _score_and_pack(setup, drawn, groups, pool, iteration, grader)
            arrays, metrics = dataclasses.asdict(samples), {**metrics, **stats}
        metrics["seconds_rollout"] = t_score - t0
        metrics["seconds_score"] = time.perf_counter() - t_score
        meta = {"sampler": drawn.sampler.to_json(), "buffer": drawn.buffer.to_json()}
        return arrays, {**meta, "metrics": metrics}

    arrays, meta = distributed.from_main(decide)
    state = dataclasses.replace(
        state,
        sampler=sampler.SamplerState.from_json(meta["sampler"]),
        buffer=partial.ReplayBuffer.from_json(meta["buffer"]),
    )
    metrics = meta["metrics"]
    if not arrays:
        return state, metrics
    rl = setup.cfg.rl
    train, train_metrics = update.rl_update(
        trainer, state.train, update.Samples(**arrays),
        rows_per_step=rl.rows_per_step, micro_batches=rl.micro_batches,
        shards=sharding.batch_shards(trainer.mesh), gap=state.engine_gap,
        max_gap=rl.engine_reference_max_gap, where=f"RL iteration {iteration}",
    )  # fmt: skip
    t_publish = time.perf_counter()
    params = distributed.host_value(train.params)  # every process: a collective
    if engine is not None:
        engine.load_weights(params)
    now = time.perf_counter()
    metrics = {**metrics, **train_metrics, "seconds_publish": now - t_publish, "seconds": now - t0}
    gap = train_metrics["logprob_mismatch_mean"]
    return dataclasses.replace(state, train=train, engine_gap=gap), metrics


def _score_and_pack(setup: Setup, drawn: run_state.RlState, groups, pool, iteration: int, grader):
    """Scores the finished groups, updates the sampler's success rates with them and packs them;
    returns (state, the update's samples, the scoring metrics). Process 0."""
    rewards, correct, stats = scoring.score_groups(
        groups, pool, setup.scorer, iteration=iteration, length=setup.cfg.length, grader=grader
    )
    problems = [s.problem for g in groups for s in g.samples]
    success = sampler.update(drawn.sampler, problems, correct.astype(float))
    packed = partial.pack(
        groups,
        iteration=iteration,
        loss_segments=setup.cfg.partial.loss_segments,
        pad_to=setup.cfg.seq_len,
    )
    samples = update.Samples(  # the update's view of the packed groups and their rewards
        tokens_bt=packed.tokens_bt,
        mask_bt=packed.mask_bt,
        segment_ids_bt=packed.segment_ids_bt,
        engine_logp_bt=packed.rollout_logp_bt,
        current_mask_bt=packed.current_mask_bt,
        reward_b=np.asarray(rewards, np.float32),
    )
    return dataclasses.replace(drawn, sampler=success), samples, stats


def _rollout(setup: Setup, engine, state: run_state.RlState, pool, iteration: int):
    """Draws this iteration's prompts and generates; returns (state, finished groups, metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    t0 = time.perf_counter()
    drawn, drawn_state = sampler.draw(
        state.sampler, cfg.sampler, iteration, rl.prompts_per_iteration
    )
    new = [(int(i), setup.prompt_ids(pool[i])) for i in drawn]
    spec = engines.SamplingSpec(
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
    # what happened in the engine (servers: failures, retries, requests per server)
    metrics.update({f"engine/{k}": v for k, v in engine.take_metrics().items()})
    return dataclasses.replace(state, sampler=drawn_state, buffer=buffer), groups, metrics


def run_rl(
    setup: Setup, engine, params, progress, console, grader: scoring.Grader | None = None
) -> tuple[decoder.Params, list[dict]]:
    """RL from `params` by `rl.objective`; returns (final params, per-iteration metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "rl")
    optimizer = rl.optimizer()  # a fresh one each iteration (`update.rl_update`)
    trainer = train_step.make_trainer(setup.model_cfg, optimizer, rl.step_config(), setup.mesh)
    fresh = train_step.init_state(params, setup.model_cfg, optimizer, setup.mesh)
    if restored := run_state.restore_latest(ckpt_dir, run_state.RlState, fresh):
        state, start = restored
        params = distributed.host_value(state.train.params)
        if engine is not None:
            engine.load_weights(params)
        log.info("resumed RL at iteration %d", start)
    else:
        state, start = start_rl(setup, engine, fresh, console), 0
        run_state.save(ckpt_dir, 0, state)
    pool = prompt_sets.select(setup.problems.train, state.train_ids)
    if grader is not None:
        grader.start(start)
    bar = progress(total=rl.iterations, initial=start, desc="RL")
    for it in range(start, rl.iterations):
        state, m = rl_iteration(setup, engine, trainer, state, pool, it, grader)
        if rl.eval_every and (it + 1) % rl.eval_every == 0 and it + 1 < rl.iterations:
            if engine is not None:  # process 0; the others' history is never written
                m["heldout_pass_at_1"] = evaluate(setup, engine)["pass_at_1"]
        state = dataclasses.replace(state, history=(*state.history, m))
        bar.update(1)
        console(report.iteration_line(m))
        if (it + 1) % rl.checkpoint_every == 0 or it + 1 == rl.iterations:
            run_state.save(ckpt_dir, it + 1, state)
    bar.close()
    return distributed.host_value(state.train.params), list(state.history)


# ----------------------------------------------------------------------------------- run


def _sft_and_rl(setup: Setup, engine, progress, console) -> tuple[decoder.Params, list, list, dict]:
    """Runs SFT, its evaluation, RL and its evaluation; returns (params, histories, results).

    Process 0 starts (or reuses) the engine and evaluates; the other processes train only and
    get empty results.
    """
    cfg = setup.cfg
    main = distributed.is_main()
    params, sft_history = warmup.run_sft(setup, progress)
    results: dict = {}
    with contextlib.ExitStack() as stack:
        if main:
            hf_dir = convert.save_hf(
                setup.model_cfg, params, os.path.join(cfg.out_dir, "sft_model"), tokenizer=setup.tok
            )
            if engine is None:
                vcfg = run_config.engine_config(cfg)
                publish = os.path.join(vcfg.publish_dir, f"run-{os.getpid()}")
                vcfg = dataclasses.replace(vcfg, publish_dir=publish)
                engine = servers.make_engine(hf_dir, vcfg, cfg.servers, run_dir=cfg.out_dir)
                stack.callback(engine.close)
            else:
                engine.load_weights(params)
            results["sft"] = atomic.json_once(
                os.path.join(cfg.out_dir, "eval_sft.json"), lambda: evaluate(setup, engine)
            )
            console(report.eval_line("SFT", results["sft"]))
            grader = run_setup.make_grader(setup, stack)
        else:
            engine = grader = None
        params, rl_history = run_rl(setup, engine, params, progress, console, grader)
        if main:
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
        Used by process 0 only.
      progress: tqdm-like progress-bar factory (default `report.progress_bar`).
      console: receives the one-line summaries.
    """
    main = distributed.is_main()
    progress = progress or report.progress_bar
    if not main:
        progress, console = report.Quiet, lambda *a, **k: None
    t_start = time.perf_counter()
    cfg = run_setup.with_judge_fingerprint(cfg)
    run_config.check_out_dir_everywhere(cfg)
    with contextlib.ExitStack() as stack:
        box = None
        if cfg.task.reward == "code" and main:
            box = stack.enter_context(sandbox_lib.Sandbox(cfg.sandbox))
        setup = prepare(cfg, sandbox=box)
        n_params = sum(x.size for x in jax.tree.leaves(setup.params))
        for line in run_setup.removed_lines(setup):
            console(line)
        run_setup.check_problems(setup)
        console(
            f"model {setup.model_cfg.architecture} with {n_params:,} parameters; "
            f"{len(setup.problems.train)} RL problems, {len(setup.problems.held_out)} held-out"
            + (f"; {jax.process_count()} processes" if distributed.multi() else "")
        )
        run_setup.check_memory(setup, console)
        params, sft_history, rl_history, results = _sft_and_rl(setup, engine, progress, console)
    if not main:
        return {"params": params}
    convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "rl_model"), tokenizer=setup.tok
    )
    results.update(
        wall_seconds=time.perf_counter() - t_start,
        parameters=n_params,
        removed=run_setup.removed_counts(setup),
    )
    report.write(cfg.out_dir, as_json(cfg), sft_history, rl_history, results)
    console(f"report: {os.path.join(cfg.out_dir, 'report.md')}")
    return {**results, "params": params}
