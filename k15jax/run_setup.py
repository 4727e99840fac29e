"""Everything a run reads, built once from its `RunConfig`: model, tokenizer, problems, scorer.

`prepare(cfg)` returns the frozen `Setup` every phase of `loop` takes; nothing changes it.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
from jax.sharding import Mesh

from k15jax import convert, data, evaluation, model, rollout, scoring, sharding, tokenizer
from k15jax.config import ModelConfig
from k15jax.rewards import sandbox as sandbox_lib
from k15jax.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every phase reads; built once by `prepare`, never changed."""

    cfg: RunConfig
    model_cfg: ModelConfig  # the trainer's model: shape, dtype, kernels
    params: model.Params  # the starting weights, placed on `mesh`
    tok: tokenizer.Tokenizer
    problems: data.ProblemSet
    scorer: scoring.Scorer
    mesh: Mesh

    def encode_prompt(self, text: str) -> list[int]:
        """Returns the token ids of a problem text in the run's prompt template."""
        return self.tok.encode(self.cfg.task.prompt_template.format(prompt=text))

    def prompt_ids(self, problem: data.Problem) -> list[int]:
        """Returns `problem`'s prompt ids; refuses one over `task.max_prompt_tokens`."""
        return data.prompt_ids(
            problem, encode=self.encode_prompt, max_tokens=self.cfg.task.max_prompt_tokens
        )


def prepare(cfg: RunConfig, *, sandbox: sandbox_lib.Sandbox | None = None) -> Setup:
    """Loads or builds the model, tokenizer, problems and scorer of the run."""
    mesh = sharding.make_mesh(cfg.mesh)
    check_batches(cfg, sharding.batch_shards(mesh))
    if cfg.model_dir is not None:
        if not os.path.isdir(cfg.model_dir):
            raise FileNotFoundError(f"--model={cfg.model_dir}: no such directory")
        shape, params = convert.load_hf(cfg.model_dir, dtype=cfg.model.dtype)
        model_cfg = dataclasses.replace(shape, kernels=cfg.model.kernels)
        params = sharding.shard_params(params, model_cfg, mesh)  # host arrays to their shards
        tok = tokenizer.load(cfg.model_dir)
    else:
        tok = tokenizer.builtin()
        model_cfg = dataclasses.replace(
            cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
        )
        # Built where it lives: each device computes only its shards of the initial weights.
        init = functools.partial(model.init, model_cfg)
        shardings = sharding.param_shardings(model_cfg, mesh)
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))
    scorer = scoring.Scorer(
        reward_fn=scoring.reward_fn(cfg.task.reward, sandbox=sandbox),
        decode=tok.decode,
        truncation_penalty=cfg.partial.truncation_penalty,
        repeat_penalty=cfg.partial.repeat_penalty,
    )
    problems = data.load_problems(cfg.task, held_out_problems=cfg.eval.problems, seed=cfg.seed)
    return Setup(cfg, model_cfg, params, tok, problems, scorer, mesh)


def check_batches(cfg: RunConfig, shards: int) -> None:
    """Refuses batch sizes that the mesh's `shards` (data x fsdp devices) do not divide."""
    micro = cfg.rl.rows_per_step // cfg.rl.micro_batches
    for name, rows in (("RL micro-batch", micro), ("SFT batch", cfg.sft.batch_size)):
        if rows % shards:
            raise ValueError(
                f"{name} of {rows} rows does not split over the mesh's data x fsdp = {shards} "
                "devices (RL: groups_per_step x samples_per_prompt / micro_batches; SFT: "
                "sft_batch_size); change them or --mesh"
            )


def evaluate(setup: Setup, engine: rollout.RolloutEngine) -> dict:
    """Returns held-out pass@1, its 95% interval and mean length (`evaluation.evaluate`)."""
    held_out = setup.problems.held_out
    return evaluation.evaluate(
        engine,
        held_out,
        [setup.prompt_ids(p) for p in held_out],
        setup.scorer,
        setup.cfg.eval,
        max_tokens=setup.cfg.partial.max_length,
        repeat=setup.cfg.repeat,
        seed=setup.cfg.seed + 1,
    )
