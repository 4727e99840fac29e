"""The k1.5 run: long-CoT SFT warm-up -> mirror-descent RL with vLLM rollouts -> evaluation.

One readable function per phase; `run(cfg)` composes them. Every piece of state that changes
across iterations (params, optimizer state, sampler, partial-rollout buffer, iteration, metric
history) is in the checkpoint, and every random choice derives from (seed, phase, step), so a
run killed at any moment and started again with the same command continues from its last
checkpoint and ends with the same params as an uninterrupted run (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
import optax

from k15jax import (
    checkpoint,
    convert,
    data,
    difficulty,
    model,
    partial,
    report,
    rollout,
    sampler,
    sharding,
    tasks,
    tokenizer,
    train_step,
)
from k15jax.config import ATTENTION_IMPLS, ModelConfig
from k15jax.rewards import code as code_reward
from k15jax.rewards import length as length_reward
from k15jax.rewards import math as math_reward
from kernels import logprobs as kernel_logprobs

log = logging.getLogger(__name__)

REWARDS = ("task", "math", "code")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Where problems come from: the built-in task, or JSONL files with a reward."""

    data: str | None = None  # JSONL prompt set; None: the built-in arithmetic task
    eval_data: str | None = None  # JSONL held-out set; None: the hashed split of `data`
    reward: str = "task"  # "task" (built-in checker), "math" (math-verify), "code" (sandbox)
    prompt_template: str = "{prompt}"
    train_problems: int = 512  # built-in task: size of the RL pool
    sft_examples: int = 8000  # built-in task: warm-up traces
    # Fraction of warm-up traces that answer directly (the solver's short trace) instead of
    # reasoning step by step; RL then learns from reward when long reasoning pays off.
    short_fraction: float = 0.0
    min_terms: int = 2
    max_terms: int = 4
    max_term: int = 9  # built-in task: terms are 1..max_term

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r} must be one of {REWARDS}")
        if not 0 <= self.short_fraction <= 1:
            raise ValueError(f"short_fraction={self.short_fraction} must be in [0, 1]")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain {{prompt}}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftConfig:
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    checkpoint_every: int = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class RlConfig:
    iterations: int = 45
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 8  # k
    temperature: float = 1.0
    learning_rate: float = 1e-4
    tau: float = 0.1
    groups_per_step: int = 16  # prompts per optimizer step; steps/iteration = finished / this
    max_grad_norm: float = 1.0
    difficulty_samples: int = 8  # samples per prompt for the pass-rate estimate
    drop_solved: bool = True  # drop problems the SFT model always solves
    checkpoint_every: int = 5
    eval_every: int = 15  # held-out evaluation every this many iterations (0: never)

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which attention and log-prob implementations the trainer uses (kernels/)."""

    attention_impl: str = "xla"  # kernels.attention.IMPLS; "xla_chunked" for long sequences
    attention_block: int = 512  # tile of the blockwise implementations
    logprob_impl: str = "xla"  # kernels.logprobs.IMPLS; "xla": all logits at once
    logprob_chunk: int = 1024  # rows of logits per step of "xla_chunked"
    remat: bool = False  # recompute each layer in the backward pass (scan over layers)

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if self.logprob_impl not in kernel_logprobs.IMPLS:
            raise ValueError(f"logprob_impl={self.logprob_impl!r} not in {kernel_logprobs.IMPLS}")
        if self.attention_block < 1 or self.logprob_chunk < 1:
            raise ValueError(
                f"attention_block={self.attention_block}, logprob_chunk={self.logprob_chunk} "
                "must be >= 1"
            )

    def model(self, cfg: ModelConfig) -> ModelConfig:
        """Returns `cfg` with these kernel choices."""
        return dataclasses.replace(
            cfg,
            attention_impl=self.attention_impl,
            attention_block=self.attention_block,
            remat=self.remat,
        )

    def step(self, **kwargs) -> train_step.StepConfig:
        """Returns a StepConfig with these log-prob choices and `kwargs`."""
        return train_step.StepConfig(
            logprob_impl=self.logprob_impl, logprob_chunk=self.logprob_chunk, **kwargs
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    problems: int = 256
    samples: int = 4
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    model_dir: str | None = None  # Hugging Face directory; None: the built-in tiny model
    model: ModelConfig = ModelConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        attention_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    task: TaskConfig = TaskConfig()
    sft: SftConfig = SftConfig()
    rl: RlConfig = RlConfig()
    eval: EvalConfig = EvalConfig()
    kernels: KernelConfig = KernelConfig()
    partial: partial.PartialConfig = partial.PartialConfig(budget=192, max_length=256)
    sampler: sampler.SamplerConfig = sampler.SamplerConfig(
        curriculum_iterations=10, hard_threshold=0.75
    )
    length: length_reward.LengthPenaltyConfig = length_reward.LengthPenaltyConfig(
        weight=0.1, warmup_iterations=15
    )
    repeat: rollout.RepeatSpec | None = rollout.RepeatSpec(
        min_pattern=2, max_pattern=32, min_count=4
    )
    # No prefix caching: a resumed run must see the numerics of an uninterrupted one.
    vllm: rollout.VllmConfig = rollout.VllmConfig(max_model_len=512, enable_prefix_caching=False)
    max_prompt_tokens: int = 24


def _asdict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ------------------------------------------------------------------------------ set-up


@dataclasses.dataclass
class Setup:
    cfg: RunConfig
    model_cfg: ModelConfig
    params: model.Params
    tok: tokenizer.Tokenizer
    train: list[data.Problem]
    held_out: list[data.Problem]
    sft_examples: list[tuple[list[int], list[int]]]  # (prompt ids, response ids incl. eos)
    reward_fn: object
    mesh: object


def check_out_dir(cfg: RunConfig) -> None:
    """Refuses an output directory that holds a different run; records this run's config.

    Engine knobs (`vllm`) may change between a run and its resumption; nothing else may.
    """
    path = os.path.join(cfg.out_dir, "run_config.json")
    mine = _asdict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        keys = (set(mine) | set(theirs)) - {"vllm", "out_dir"}
        diff = sorted(k for k in keys if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(
                f"{cfg.out_dir} holds a different run's checkpoints (config differs in {diff}); "
                "use another --out_dir or the same flags to resume"
            )
    os.makedirs(cfg.out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(mine, f, indent=2)
    os.replace(tmp, path)


def prepare(cfg: RunConfig) -> Setup:
    """Loads or builds the model, tokenizer, problems and SFT data of the run."""
    if cfg.model_dir is not None:
        if not os.path.isdir(cfg.model_dir):
            raise FileNotFoundError(f"--model={cfg.model_dir}: no such directory")
        model_cfg, params = convert.load_hf(cfg.model_dir, dtype=cfg.vllm.dtype)
        model_cfg = cfg.kernels.model(model_cfg)
        tok = tokenizer.load(cfg.model_dir)
    else:
        tok = tokenizer.builtin()
        model_cfg = dataclasses.replace(
            cfg.kernels.model(cfg.model),
            vocab_size=tok.vocab_size,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
        params = model.init(model_cfg, jax.random.key(cfg.seed))
    t = cfg.task
    if t.data is None:
        gen = dict(min_terms=t.min_terms, max_terms=t.max_terms, max_term=t.max_term)
        sft_set = tasks.generate(t.sft_examples, seed=cfg.seed, unique=False, **gen)
        pool = tasks.generate(t.train_problems, seed=cfg.seed + 1, **gen)
        held = tasks.generate(cfg.eval.problems, seed=cfg.seed, split="held_out", **gen)
        to_problem = lambda i, e: data.Problem(str(i), e.prompt, e.answer, e.difficulty)
        train = [to_problem(i, e) for i, e in enumerate(pool)]
        held_out = [to_problem(i, e) for i, e in enumerate(held)]
        short = np.random.default_rng([cfg.seed, 2]).random(len(sft_set)) < t.short_fraction
        sft_examples = [
            (tok.encode(e.prompt), tok.encode(e.short_trace if s else e.long_trace) + [tok.eos_id])
            for e, s in zip(sft_set, short, strict=True)
        ]
        reward_fn = tasks.reward
    else:
        problems = data.load_jsonl(t.data)
        if t.eval_data:
            train, held_out = problems, data.load_jsonl(t.eval_data)
        else:
            train = [p for p in problems if not tasks.is_held_out(p.prompt)]
            held_out = [p for p in problems if tasks.is_held_out(p.prompt)]
        held_out = held_out[: cfg.eval.problems]
        sft_examples = []
        reward_fn = {"math": math_reward.reward, "code": code_reward.reward}.get(
            t.reward, tasks.reward
        )
    mesh = sharding.make_mesh((-1, 1, 1))
    return Setup(cfg, model_cfg, params, tok, train, held_out, sft_examples, reward_fn, mesh)


def prompt_ids(setup: Setup, problem: data.Problem) -> list[int]:
    ids = setup.tok.encode(setup.cfg.task.prompt_template.format(prompt=problem.prompt))
    if len(ids) > setup.cfg.max_prompt_tokens:
        raise ValueError(
            f"problem {problem.id}: prompt of {len(ids)} tokens exceeds "
            f"max_prompt_tokens={setup.cfg.max_prompt_tokens}"
        )
    return ids


def _seq_len(cfg: RunConfig) -> int:
    return cfg.max_prompt_tokens + cfg.partial.max_length


# --------------------------------------------------------------------------------- SFT


def run_sft(setup: Setup, progress) -> tuple[model.Params, list[dict]]:
    """Long-CoT warm-up: masked cross-entropy on solver traces; returns (params, history)."""
    cfg, sft = setup.cfg, setup.cfg.sft
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "sft")
    if sft.steps == 0 or not setup.sft_examples:
        return setup.params, []
    warmup = min(sft.warmup_steps, sft.steps // 2)  # short runs keep a decay phase
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, sft.learning_rate, warmup, max(sft.steps, warmup + 1), sft.learning_rate * 0.1
    )
    opt = train_step.make_optimizer(schedule)
    step_cfg = cfg.kernels.step(objective="sft", group_size=1)
    step = train_step.make_train_step(setup.model_cfg, opt, step_cfg, setup.mesh)
    state = train_step.init_state(setup.params, opt, seed=cfg.seed)
    history, start = [], 0
    if (last := checkpoint.latest_step(ckpt_dir)) is not None:
        state, extra = checkpoint.restore(ckpt_dir, last, state)
        history, start = extra["history"], last
        log.info("resumed SFT at step %d", last)
    if start >= sft.steps:
        return jax.device_get(state.params), history
    state = train_step.place_state(state, setup.model_cfg, opt, setup.mesh)
    t_len = _seq_len(cfg)
    bar = progress(total=sft.steps, initial=start, desc="SFT")
    for i in range(start, sft.steps):
        rng = np.random.default_rng([cfg.seed, 1, i])
        idx = rng.integers(0, len(setup.sft_examples), sft.batch_size)
        tokens = np.zeros((sft.batch_size, t_len), np.int32)
        mask = np.zeros((sft.batch_size, t_len), np.float32)
        seg = np.zeros((sft.batch_size, t_len), np.int32)
        for row, k in enumerate(idx):
            p, r = setup.sft_examples[k]
            ids = (p + r)[:t_len]
            tokens[row, : len(ids)], seg[row, : len(ids)] = ids, 1
            mask[row, len(p) : len(ids)] = 1
        t0 = time.perf_counter()
        state, m = step(state, train_step.Batch.for_sft(tokens, mask, seg))
        loss = float(m["loss"])
        if int(m["skipped"]):
            raise FloatingPointError(
                f"non-finite SFT loss at step {i}; the update was refused and the checkpoints "
                f"in {ckpt_dir} are intact"
            )
        history.append(
            {
                "step": i,
                "loss": loss,
                "train_tokens_per_s": float(seg.sum()) / (time.perf_counter() - t0),
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (i + 1) % sft.checkpoint_every == 0 or i + 1 == sft.steps:
            checkpoint.save(ckpt_dir, i + 1, jax.device_get(state), {"history": history})
    bar.close()
    return jax.device_get(state.params), history


# ------------------------------------------------------------------------------ evaluation


def evaluate(setup: Setup, engine, *, seed: int) -> dict:
    """Returns held-out pass@1 (mean over samples) with a 95% interval and mean length."""
    ev = setup.cfg.eval
    problems = setup.held_out
    spec = rollout.SamplingSpec(
        n=ev.samples,
        temperature=ev.temperature,
        max_tokens=setup.cfg.partial.max_length,
        repeat=setup.cfg.repeat,
    )
    prompts = [prompt_ids(setup, p) for p in problems]
    out = engine.generate(prompts, spec, seeds=[seed * 7919 + i for i in range(len(prompts))])
    per_problem = np.zeros(len(problems))
    lengths = []
    for c in out:
        p = problems[c.prompt_index]
        ok = (
            c.finish_reason == "stop"
            and setup.reward_fn(p.prompt, setup.tok.decode(c.token_ids), p.answer)[0] >= 1.0
        )
        per_problem[c.prompt_index] += ok / ev.samples
        lengths.append(len(c.token_ids))
    mean = float(per_problem.mean())
    # Normal interval over problems (samples of one problem are not independent).
    half = 1.96 * float(per_problem.std(ddof=1)) / np.sqrt(len(problems))
    return {
        "pass_at_1": mean,
        "ci95": [mean - half, mean + half],
        "mean_length": float(np.mean(lengths)),
        "problems": len(problems),
        "samples": ev.samples,
    }


# ---------------------------------------------------------------------------------- RL


def score(
    setup: Setup, groups: list[partial.Group], iteration: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Returns (total reward, correct or not, statistics) of the samples of `groups`, row order."""
    cfg = setup.cfg
    k = cfg.rl.samples_per_prompt
    task_r, correct, lengths = [], [], []
    for g in groups:
        p = setup.train[g.samples[0].problem]
        for s in g.samples:
            if s.finish_reason == "truncated":
                r, ok = -cfg.partial.truncation_penalty, False
            else:
                r = setup.reward_fn(p.prompt, setup.tok.decode(s.response_ids), p.answer)[0]
                ok = r >= 1.0
                if s.finish_reason == "repeat":
                    r -= cfg.partial.repeat_penalty
            task_r.append(r)
            correct.append(ok)
            lengths.append(s.length)
    task_r, correct, lengths = map(np.asarray, (task_r, correct, lengths))
    w = length_reward.length_weight(
        iteration, weight=cfg.length.weight, warmup_iterations=cfg.length.warmup_iterations
    )
    len_r = np.asarray(length_reward.length_reward(lengths, correct, group_size=k))
    total = task_r + w * len_r
    stats = {
        "accuracy": float(correct.mean()),
        "task_reward": float(task_r.mean()),
        "length_reward": float(len_r.mean()),
        "length_weight": w,
        "reward": float(total.mean()),
        "response_length": float(lengths.mean()),
        "repeats": float(np.mean([s.finish_reason == "repeat" for g in groups for s in g.samples])),
        "truncated": float(
            np.mean([s.finish_reason == "truncated" for g in groups for s in g.samples])
        ),
    }
    return total.astype(np.float32), correct, stats


def _minibatches(packed: partial.PackedGroups, rewards: np.ndarray, rows: int):
    """Yields fixed-size row blocks; the last is padded with invalid rows (valid_b = 0)."""
    n = rewards.shape[0]
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows)
        valid = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, start)  # padding rows repeat a real group, masked out
        yield idx, valid


def rl_iteration(setup, engine, state, sampler_state, buffer, iteration, fns) -> tuple:
    """Runs one k1.5 iteration (spec §11); returns (state, sampler, buffer, metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    k = rl.samples_per_prompt
    t0 = time.perf_counter()
    drawn, sampler_state = sampler.draw(
        sampler_state, cfg.sampler, iteration, rl.prompts_per_iteration
    )
    new = [(int(i), prompt_ids(setup, setup.train[i])) for i in drawn]
    spec = rollout.SamplingSpec(n=k, temperature=rl.temperature, repeat=cfg.repeat)
    groups, buffer, rstats = partial.rollout(
        engine,
        buffer,
        new,
        spec,
        cfg.partial,
        iteration=iteration,
        seed=cfg.seed * 100_003 + iteration,
    )
    t_rollout = time.perf_counter() - t0
    metrics = {
        "iteration": iteration,
        "rollout_tokens_per_s": rstats["new_tokens"] / t_rollout,
        "pending_samples": rstats["pending_samples"],
        "finished_groups": len(groups),
        "resumed": rstats["resumed"],
    }
    if not groups:
        return state, sampler_state, buffer, metrics
    rewards, correct, sstats = score(setup, groups, iteration)
    metrics.update(sstats)
    problems = [g.samples[0].problem for g in groups for _ in g.samples]
    sampler_state = sampler.update(sampler_state, problems, correct.astype(float))
    packed = partial.pack(
        groups, iteration=iteration, loss_segments=cfg.partial.loss_segments, pad_to=_seq_len(cfg)
    )
    rows = rl.groups_per_step * k
    # π_{θ_i}: recomputed by the trainer, not trusted from the engine.
    ref = np.zeros_like(packed.rollout_logp_bt)
    for idx, valid in _minibatches(packed, rewards, rows):
        out = np.asarray(
            fns["logp"](state.params, packed.tokens_bt[idx], packed.segment_ids_bt[idx])
        )
        ref[idx[valid > 0]] = out[valid > 0]
    current = np.zeros_like(packed.mask_bt)
    for i, s in enumerate(s for g in groups for s in g.samples):
        p = len(s.prompt_ids)
        current[i, p : p + s.length] = partial.loss_mask(s, iteration, "current")
    metrics.update(partial.logprob_mismatch(packed.rollout_logp_bt, ref, current))
    state = train_step.reset_optimizer(state, fns["opt"])
    t1 = time.perf_counter()
    step_metrics = []
    for idx, valid in _minibatches(packed, rewards, rows):
        batch = train_step.Batch(
            tokens_bt=packed.tokens_bt[idx],
            mask_bt=packed.mask_bt[idx] * valid[:, None],
            ref_logp_bt=ref[idx],
            reward_b=rewards[idx],
            segment_ids_bt=packed.segment_ids_bt[idx],
            valid_b=valid,
        )
        state, m = fns["step"](state, batch)
        if int(m["skipped"]):
            raise FloatingPointError(
                f"non-finite loss or gradient at RL iteration {iteration}; the update was "
                f"refused and the checkpoints in {cfg.out_dir} are intact"
            )
        step_metrics.append({key: float(v) for key, v in m.items()})
    t_train = time.perf_counter() - t1
    for key in ("loss", "delta_mean", "delta_abs_mean", "zero_variance_groups", "grad_norm"):
        metrics[key] = float(np.mean([m[key] for m in step_metrics]))
    metrics["optimizer_steps"] = len(step_metrics)
    metrics["train_tokens_per_s"] = float(packed.segment_ids_bt.sum()) / t_train
    engine.load_weights(jax.device_get(state.params))
    metrics["seconds"] = time.perf_counter() - t0
    return state, sampler_state, buffer, metrics


def run_rl(setup: Setup, engine, params, progress, console) -> tuple[model.Params, list[dict]]:
    """Mirror-descent RL from `params`; returns (final params, per-iteration metrics)."""
    cfg, rl = setup.cfg, setup.cfg.rl
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", "rl")
    opt = train_step.make_optimizer(rl.learning_rate, max_grad_norm=rl.max_grad_norm)
    step_cfg = cfg.kernels.step(tau=rl.tau, group_size=rl.samples_per_prompt)
    fns = {
        "opt": opt,
        "step": train_step.make_train_step(setup.model_cfg, opt, step_cfg, setup.mesh),
        "logp": jax.jit(
            lambda p, tok, seg: train_step.sequence_logprobs(
                setup.model_cfg,
                p,
                tok,
                seg,
                chunk_size=step_cfg.logprob_chunk,
                impl=step_cfg.logprob_impl,
            )
        ),
    }
    state = train_step.init_state(params, opt, seed=cfg.seed)
    if (last := checkpoint.latest_step(ckpt_dir)) is not None:
        state, extra = checkpoint.restore(ckpt_dir, last, state)
        sampler_state = sampler.SamplerState.from_json(extra["sampler"])
        buffer = partial.ReplayBuffer.from_json(extra["buffer"])
        history = extra["history"]
        start = last
        keep = set(extra["train_ids"])  # the problems that survived the difficulty filter
        setup.train = [p for p in setup.train if p.id in keep]
        engine.load_weights(jax.device_get(state.params))
        log.info("resumed RL at iteration %d", last)
    else:
        rates = np.asarray(
            difficulty.pass_rates(
                engine,
                setup.train,
                setup.reward_fn,
                difficulty.TextCodec(
                    lambda s: setup.tok.encode(cfg.task.prompt_template.format(prompt=s)),
                    setup.tok.decode,
                ),
                n=rl.difficulty_samples,
                temperature=1.0,
                max_tokens=cfg.partial.max_length,
                seed=cfg.seed,
            )
        )
        if rl.drop_solved:
            setup.train, rates = difficulty.filter_problems(setup.train, rates)
        console(
            f"difficulty: {len(setup.train)} problems kept, mean SFT pass rate {rates.mean():.3f}"
        )
        sampler_state = sampler.init_state(rates, seed=cfg.seed)
        buffer, history, start = partial.ReplayBuffer(), [], 0
        _save_rl(ckpt_dir, 0, state, sampler_state, buffer, history, setup)
    state = train_step.place_state(state, setup.model_cfg, opt, setup.mesh)
    bar = progress(total=rl.iterations, initial=start, desc="RL")
    for it in range(start, rl.iterations):
        state, sampler_state, buffer, m = rl_iteration(
            setup, engine, state, sampler_state, buffer, it, fns
        )
        if rl.eval_every and (it + 1) % rl.eval_every == 0 and it + 1 < rl.iterations:
            m["heldout_pass_at_1"] = evaluate(setup, engine, seed=cfg.seed + 1)["pass_at_1"]
        history.append(m)
        bar.update(1)
        console(report.iteration_line(m))
        if (it + 1) % rl.checkpoint_every == 0 or it + 1 == rl.iterations:
            _save_rl(ckpt_dir, it + 1, state, sampler_state, buffer, history, setup)
    bar.close()
    return jax.device_get(state.params), history


def _save_rl(ckpt_dir, step, state, sampler_state, buffer, history, setup):
    extra = {
        "sampler": sampler_state.to_json(),
        "buffer": buffer.to_json(),
        "history": history,
        "train_ids": [p.id for p in setup.train],
    }
    checkpoint.save(ckpt_dir, step, jax.device_get(state), extra)


# ----------------------------------------------------------------------------------- run


def _json_once(path: str, compute):
    """Returns the JSON at `path`, computing and writing it (atomically) if absent."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)
    return value


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
    setup = prepare(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(setup.params))
    console(
        f"model {setup.model_cfg.architecture} with {n_params:,} parameters; "
        f"{len(setup.train)} RL problems, {len(setup.held_out)} held-out"
    )
    params, sft_history = run_sft(setup, progress)
    hf_dir = convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "sft_model"), tokenizer=setup.tok
    )
    own_engine = engine is None
    if own_engine:
        engine = rollout.VllmEngine(
            hf_dir,
            dataclasses.replace(
                cfg.vllm, publish_dir=os.path.join(cfg.vllm.publish_dir, f"run-{os.getpid()}")
            ),
        )
    else:
        engine.load_weights(params)
    try:
        sft_eval = _json_once(
            os.path.join(cfg.out_dir, "eval_sft.json"),
            lambda: evaluate(setup, engine, seed=cfg.seed + 1),
        )
        console(
            f"SFT held-out pass@1 {sft_eval['pass_at_1']:.3f} "
            f"[{sft_eval['ci95'][0]:.3f}, {sft_eval['ci95'][1]:.3f}], "
            f"mean length {sft_eval['mean_length']:.1f}"
        )
        params, rl_history = run_rl(setup, engine, params, progress, console)
        engine.load_weights(params)
        rl_eval = _json_once(
            os.path.join(cfg.out_dir, "eval_rl.json"),
            lambda: evaluate(setup, engine, seed=cfg.seed + 1),
        )
    finally:
        if own_engine:
            engine.close()
    console(
        f"RL  held-out pass@1 {rl_eval['pass_at_1']:.3f} "
        f"[{rl_eval['ci95'][0]:.3f}, {rl_eval['ci95'][1]:.3f}], "
        f"mean length {rl_eval['mean_length']:.1f}"
    )
    convert.save_hf(
        setup.model_cfg, params, os.path.join(cfg.out_dir, "rl_model"), tokenizer=setup.tok
    )
    results = {
        "sft": sft_eval,
        "rl": rl_eval,
        "wall_seconds": time.perf_counter() - t_start,
        "parameters": n_params,
    }
    report.write(cfg.out_dir, _asdict(cfg), sft_history, rl_history, results)
    console(f"report: {os.path.join(cfg.out_dir, 'report.md')}")
    return {**results, "params": params}
