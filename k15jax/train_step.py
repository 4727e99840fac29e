"""The pure, sharded mirror-descent train step: TrainState, Batch, make_train_step.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, compiled once with
`jax.jit` and explicit in/out shardings on a (data, fsdp, tensor) mesh. Gradients accumulate over
micro-batches (each a whole number of groups, so the group baseline is exact); a step whose loss
or gradients are not finite is refused: params and optimizer state stay as they were and
`metrics["skipped"] = 1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15jax import losses, model, sharding
from k15jax.config import ModelConfig
from kernels import logprobs as kernel_logprobs


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: model.Params
    opt_state: optax.OptState
    rng: jax.Array


@flax.struct.dataclass
class Batch:
    """One RL batch; rows are samples, each group of `group_size` consecutive rows one prompt."""

    tokens_bt: jax.Array  # prompt + response ids, right-padded
    mask_bt: jax.Array  # 1 on response tokens that enter the loss
    ref_logp_bt: jax.Array  # log π_{θ_i} of each token (aligned like losses.token_logprobs)
    reward_b: jax.Array  # total reward per sample
    segment_ids_bt: jax.Array  # 1 on real tokens, 0 on padding
    valid_b: jax.Array  # 1 on real rows, 0 on padding rows (fixed batch shapes)

    @classmethod
    def for_sft(cls, tokens_bt, mask_bt, segment_ids_bt, valid_b=None) -> Batch:
        """Returns a batch for the SFT objective (no reference log-probs or rewards)."""
        b, t = tokens_bt.shape
        return cls(
            tokens_bt=tokens_bt,
            mask_bt=mask_bt,
            ref_logp_bt=np.zeros((b, t), np.float32),
            reward_b=np.zeros((b,), np.float32),
            segment_ids_bt=segment_ids_bt,
            valid_b=np.ones((b,), np.float32) if valid_b is None else valid_b,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    """Numerics of one optimizer step of the mirror-descent update."""

    tau: float = 0.1
    group_size: int = 4
    micro_batches: int = 1
    logprob_chunk: int | None = 1024  # rows of logits per step of xla_chunked; None: all
    logprob_impl: str = "xla_chunked"  # kernels.logprobs.IMPLS
    normalize_by_length: bool = False
    objective: str = "mirror_descent"  # or "sft": masked cross-entropy on the same batch type

    def __post_init__(self):
        if self.objective not in ("mirror_descent", "sft"):
            raise ValueError(f"objective={self.objective!r} must be 'mirror_descent' or 'sft'")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau} must be > 0")
        if self.logprob_impl not in kernel_logprobs.IMPLS:
            raise ValueError(
                f"logprob_impl={self.logprob_impl!r} must be one of {kernel_logprobs.IMPLS}"
            )
        if self.group_size < 1 or self.micro_batches < 1:
            raise ValueError(
                f"group_size={self.group_size}, micro_batches={self.micro_batches} must be >= 1"
            )


def make_optimizer(
    learning_rate: float, *, max_grad_norm: float = 1.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Returns AdamW behind global-norm gradient clipping (the paper names no optimizer)."""
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=weight_decay),
    )


def sequence_logprobs(
    cfg: ModelConfig, params, tokens_bt, segment_ids_bt, *, chunk_size, impl="xla_chunked"
):
    """Returns per-token log-probs [b, t] of `tokens_bt` under `params` (chunked over t)."""
    hidden = model.hidden_states(cfg, params, tokens_bt, segment_ids=segment_ids_bt)
    return losses.token_logprobs(
        hidden, model.output_embedding(cfg, params), tokens_bt, chunk_size=chunk_size, impl=impl
    )


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Returns the sharding tree of a TrainState: optimizer moments follow their params."""
    p_shard = sharding.param_shardings(cfg, mesh)
    abstract = model.abstract_params(cfg)
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    rep = sharding.replicated(mesh)
    opt_shard = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_abstract,
        p_shard,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    # Any leaf tree_map_params could not pair with a param (scalars, counts) is replicated.
    opt_shard = jax.tree.map(
        lambda x: x if isinstance(x, NamedSharding) else rep,
        opt_shard,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)


def batch_shardings(mesh: Mesh) -> Batch:
    bt, b = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    return Batch(tokens_bt=bt, mask_bt=bt, ref_logp_bt=bt, reward_b=b, segment_ids_bt=bt, valid_b=b)


def init_state(params, optimizer: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """Returns a TrainState at step 0 with fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def reset_optimizer(state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
    """Returns `state` with fresh optimizer state (k1.5 resets it at every iteration)."""
    fresh = jax.jit(
        optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state)
    )(state.params)
    return state.replace(opt_state=fresh)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    step_cfg: StepConfig,
    mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns the jitted `step(state, batch) -> (state, metrics)` of the mirror-descent update.

    The batch size must be a multiple of `group_size * micro_batches`. The state is donated.
    """
    tau, group, micro = step_cfg.tau, step_cfg.group_size, step_cfg.micro_batches

    def loss_fn(params, mb: Batch):
        logp = sequence_logprobs(
            cfg,
            params,
            mb.tokens_bt,
            mb.segment_ids_bt,
            chunk_size=step_cfg.logprob_chunk,
            impl=step_cfg.logprob_impl,
        )
        if step_cfg.objective == "sft":
            return losses.sft_loss(logp, mb.mask_bt * mb.valid_b[:, None])
        return losses.mirror_descent_loss(
            logp,
            mb.ref_logp_bt,
            mb.mask_bt,
            mb.reward_b,
            group_size=group,
            tau=tau,
            normalize_by_length=step_cfg.normalize_by_length,
            valid_b=mb.valid_b,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch):
        b = batch.reward_b.shape[0]
        if b % (group * micro):
            raise ValueError(
                f"batch {b} must be a multiple of group_size*micro_batches={group * micro}"
            )
        if micro == 1:
            (loss, metrics), grads = grad_fn(state.params, batch)
        else:
            split = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x.reshape(micro, b // micro, *x.shape[1:]),
                    NamedSharding(mesh, PartitionSpec(None, sharding.BATCH)),
                ),
                batch,
            )
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(acc, mb):
                (loss_i, m), g = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, acc, (loss_i, m, g)), None

            m0 = jax.eval_shape(lambda: loss_fn(state.params, jax.tree.map(lambda x: x[0], split)))[
                1
            ]
            init = (jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0), zeros)
            (loss, metrics, grads), _ = jax.lax.scan(body, init, split)
            loss, metrics, grads = jax.tree.map(lambda x: x / micro, (loss, metrics, grads))
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=optax.global_norm(grads),
            skipped=(~finite).astype(jnp.int32),
        )
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
        )
        return new_state, metrics

    s_shard = state_shardings(cfg, optimizer, mesh)
    return jax.jit(
        step,
        in_shardings=(s_shard, batch_shardings(mesh)),
        out_shardings=(s_shard, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def place_state(state: TrainState, cfg: ModelConfig, optimizer, mesh: Mesh) -> TrainState:
    """Returns `state` moved onto `mesh` with the shardings the train step expects."""
    return jax.device_put(state, state_shardings(cfg, optimizer, mesh))
