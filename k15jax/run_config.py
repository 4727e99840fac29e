"""The configuration of a whole run (`RunConfig`) and the check that a run directory is ours.

Each setting has one home: the model's shape, trainer dtype and kernels in `ModelConfig`, the
problems in `data.TaskConfig`, the warm-up in `sft.SftConfig`, the evaluation in
`evaluation.EvalConfig`, the RL phase in `RlConfig`, engine knobs in `rollout.VllmConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from k15jax import atomic, data, evaluation, partial, preflight, rollout, sampler, sft
from k15jax.config import ModelConfig
from k15jax.rewards import length as length_reward
from k15jax.rewards import sandbox as sandbox_lib

# Settings that may change when a run resumes: where it runs, not what it computes.
RESUMABLE_CHANGES = ("out_dir", "vllm", "mesh", "sandbox", "preflight")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RlConfig:
    iterations: int = 45
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 8  # k
    temperature: float = 1.0
    learning_rate: float = 1e-4
    tau: float = 0.1
    groups_per_step: int = 16  # prompts per optimizer step; steps/iteration = finished / this
    micro_batches: int = 1  # gradient accumulation: each step in this many slices of groups
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
        if self.micro_batches < 1 or self.groups_per_step % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} must be >= 1 and divide "
                f"groups_per_step={self.groups_per_step} (micro-batches hold whole groups)"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 1")

    @property
    def rows_per_step(self) -> int:
        """Rows (samples) of one optimizer step."""
        return self.groups_per_step * self.samples_per_prompt


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
    task: data.TaskConfig = data.TaskConfig()
    sft: sft.SftConfig = sft.SftConfig()
    rl: RlConfig = RlConfig()
    eval: evaluation.EvalConfig = evaluation.EvalConfig()
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
    sandbox: sandbox_lib.SandboxConfig = sandbox_lib.SandboxConfig()  # used by reward="code"
    preflight: preflight.PreflightConfig = preflight.PreflightConfig()

    def __post_init__(self):
        if (
            len(self.mesh) != 3
            or self.mesh.count(-1) > 1
            or any(s == 0 or s < -1 for s in self.mesh)
        ):
            raise ValueError(
                f"mesh={self.mesh} must be (data, fsdp, tensor) sizes >= 1, at most one -1"
            )

    @property
    def seq_len(self) -> int:
        """Tokens of one trainer row: the longest prompt plus the longest response."""
        return self.task.max_prompt_tokens + self.partial.max_length


def as_json(cfg) -> dict:
    """Returns a config dataclass as plain JSON data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def check_out_dir(cfg: RunConfig) -> None:
    """Refuses an output directory that holds a different run; records this run's config.

    Only `RESUMABLE_CHANGES` may differ between a run and its resumption.
    """
    path = os.path.join(cfg.out_dir, "run_config.json")
    mine = as_json(cfg)
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        keys = (set(mine) | set(theirs)) - set(RESUMABLE_CHANGES)
        diff = sorted(k for k in keys if mine.get(k) != theirs.get(k))
        if diff:
            detail = "; ".join(_first_difference(k, mine.get(k), theirs.get(k)) for k in diff)
            raise ValueError(
                f"{cfg.out_dir} holds a different run's checkpoints (config differs in {diff}: "
                f"{detail}); use another --out_dir or the same flags to resume"
            )
    atomic.write_json(path, mine)


def _first_difference(path: str, mine, theirs) -> str:
    """Returns 'a.b.c: saved X, now Y' for the first differing leaf under `path`."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                return _first_difference(f"{path}.{key}", mine.get(key), theirs.get(key))
    return f"{path}: saved {theirs!r}, now {mine!r}"
