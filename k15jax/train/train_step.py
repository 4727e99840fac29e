"""The pure, sharded mirror-descent train step: TrainState, Batch, make_train_step.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, compiled once with
`jax.jit` and explicit in/out shardings on a (data, fsdp, tensor) mesh. Gradients accumulate over
micro-batches (each a whole number of groups, so the group baseline is exact), weighted by what
each micro-batch's mean is over (valid rows, or tokens for SFT and ReST), so padding never
reweights a step; a step whose loss or gradients are not finite is refused: params and optimizer
state stay as they were and `metrics["skipped"] = 1`.

`make_trainer` bundles the jitted step and log-prob functions of one run; `reference_logprobs`
runs the log-probs over many rows in fixed-size blocks. The RL update built on them is
`train.update`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15jax.infra import distributed
from k15jax.model import decoder, sharding
from k15jax.model.config import ModelConfig
from k15jax.train import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: decoder.Params
    opt_state: optax.OptState


@flax.struct.dataclass
class Batch:
    """One RL batch; rows are samples, each group of `group_size` consecutive rows one prompt."""

    tokens_bt: jax.Array  # prompt + response ids, right-padded
    mask_bt: jax.Array  # 1 on response tokens that enter the loss
    ref_logp_bt: jax.Array  # log π_{θ_i} of each token (aligned like losses.token_logprobs)
    reward_b: jax.Array  # total reward per sample
    segment_ids_bt: jax.Array  # 1 on real tokens, 0 on padding (packed rows: 1, 2, ... per sample)
    valid_b: jax.Array  # 1 on real rows, 0 on padding rows (fixed batch shapes)
    # Packed rows (`packing`): token arrays are [r, t] rows of several samples, and each token's
    # sample indexes reward_b / valid_b; None: row i is sample i.
    sample_bt: jax.Array | None = None
    # 1 where a sample's π_{θ_i} is the step's own log-probs (the iteration's first step);
    # None: all from ref_logp_bt (`losses.mirror_descent_loss`).
    self_ref_b: jax.Array | None = None

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


OBJECTIVES = ("mirror_descent", "sft", "dpo", "rest")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
    """Numerics of one optimizer step of the mirror-descent update."""

    tau: float = 0.1
    group_size: int = 4
    micro_batches: int = 1
    normalize_by_length: bool = False
    objective: str = "mirror_descent"  # or "sft": masked cross-entropy on the same batch type
    # "dpo" (long2short, k1.5 §2.4): rows are (chosen, rejected) pairs, group_size 2, against
    # the frozen reference's log-probs in `ref_logp_bt`; `beta` is DPO's β.
    beta: float = 0.1
    # "rest" (the k1.5 Fig. 10 baseline, `losses.rest_loss`): maximum likelihood on the samples
    # whose total reward is >= this. 0.5 splits right from wrong for every reward the default
    # run gives: the task reward is 1 or 0, the length reward adds 0.1 x λ with |λ| <= 0.5 (so
    # [0.95, 1.05] or [-0.05, 0]), a truncated sample gets -0.5 (`partial.truncation_penalty`).
    # With partial credit (code), samples passing about half their tests or more are kept.
    rest_threshold: float = 0.5

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} must be one of {OBJECTIVES}")
        if self.objective == "dpo" and self.group_size != 2:
            raise ValueError(f"group_size={self.group_size} must be 2 for dpo (row pairs)")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau} must be > 0")
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


def sequence_logprobs(cfg: ModelConfig, params, tokens_bt, segment_ids_bt):
    """Returns per-token log-probs [b, t] of `tokens_bt` (`cfg.kernels` choose the kernels)."""
    hidden = decoder.hidden_states(cfg, params, tokens_bt, segment_ids=segment_ids_bt)
    return losses.token_logprobs(
        hidden,
        decoder.output_embedding(cfg, params),
        tokens_bt,
        chunk_size=cfg.kernels.logprob_chunk,
        impl=cfg.kernels.logprob_impl,
    )


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Returns the sharding tree of a TrainState: optimizer moments follow their params."""
    p_shard = sharding.param_shardings(cfg, mesh)
    abstract = decoder.abstract_params(cfg)
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
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard)


def batch_shardings(mesh: Mesh, like: Batch | None = None) -> Batch:
    """Returns the sharding tree of a Batch; the optional fields only where `like` has them."""
    bt, b = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    has = lambda name: like is not None and getattr(like, name) is not None
    return Batch(
        tokens_bt=bt, mask_bt=bt, ref_logp_bt=bt, reward_b=b, segment_ids_bt=bt, valid_b=b,
        sample_bt=bt if has("sample_bt") else None, self_ref_b=b if has("self_ref_b") else None,
    )  # fmt: skip


def init_state(
    params, cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Returns a TrainState at step 0 on `mesh`: params placed by the sharding rules, the
    optimizer state created already sharded (never whole on one device)."""
    shardings = state_shardings(cfg, optimizer, mesh)
    # A copy (the train step donates its state, and the caller may still hold `params`); host
    # arrays go shard by shard, each process transferring its own devices' shards.
    params = distributed.put(params, shardings.params)
    init = lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)
    )
    return jax.jit(init, out_shardings=shardings)(params)


def reset_optimizer(state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
    """Returns `state` with fresh optimizer state (k1.5 resets it at every iteration)."""
    fresh = jax.jit(
        optimizer.init, out_shardings=jax.tree.map(lambda x: x.sharding, state.opt_state)
    )(state.params)
    return state.replace(opt_state=fresh)


def _mean_count(step_cfg: StepConfig, batch: Batch) -> jax.Array:
    """Returns what the objective's loss on `batch` is a mean over: tokens (SFT), kept samples'
    tokens (ReST) or valid rows."""
    if step_cfg.objective == "sft":
        return jnp.sum(batch.mask_bt * batch.valid_b[:, None])
    if step_cfg.objective == "rest":
        return losses.rest_kept_tokens(
            batch.mask_bt,
            batch.reward_b,
            threshold=step_cfg.rest_threshold,
            valid_b=batch.valid_b,
            sample_bt=batch.sample_bt,
        )
    return jnp.sum(batch.valid_b)


def _accumulate(grad_fn, params, batch: Batch, step_cfg: StepConfig, mesh: Mesh):
    """Returns (loss, metrics, grads) of `batch` from `step_cfg.micro_batches` slices in a scan.

    Each slice's loss is a mean over its own rows (tokens for SFT and ReST); the batch's is the
    mean over all of them, so each slice enters weighted by its share of that count, not by
    1/micro. ReST's metrics other than its "nll" are means over valid rows and get the rows'
    weights (its loss weights are 0 for a slice that keeps nothing).
    """
    micro = step_cfg.micro_batches
    split = jax.tree.map(  # packed rows: each slice of rows holds its slice of samples
        lambda x: jax.lax.with_sharding_constraint(
            x.reshape(micro, x.shape[0] // micro, *x.shape[1:]),
            NamedSharding(mesh, PartitionSpec(None, sharding.BATCH)),
        ),
        batch,
    )
    share = lambda c: c / jnp.maximum(c.sum(), 1.0)
    weights = share(jax.vmap(lambda mb: _mean_count(step_cfg, mb))(split))
    rows = share(jnp.sum(split.valid_b, axis=1))

    def body(acc, xs):
        mb, w, w_rows = xs
        (loss_i, m), g = grad_fn(params, mb)
        if step_cfg.objective == "rest":
            w_of = lambda key: w if key == "nll" else w_rows
        else:
            w_of = lambda key: w
        m = {key: w_of(key) * x.astype(jnp.float32) for key, x in m.items()}
        g = jax.tree.map(lambda x: (w * x).astype(x.dtype), g)
        return jax.tree.map(jnp.add, acc, (w * loss_i, m, g)), None

    first = jax.tree.map(lambda x: x[0], split)
    (_, m0), _ = jax.eval_shape(grad_fn, params, first)
    init = (
        jnp.zeros(()),
        jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), m0),
        jax.tree.map(jnp.zeros_like, params),
    )
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (split, weights, rows))
    return loss, metrics, grads


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
        logp = sequence_logprobs(cfg, params, mb.tokens_bt, mb.segment_ids_bt)
        if step_cfg.objective == "sft":
            return losses.sft_loss(logp, mb.mask_bt * mb.valid_b[:, None])
        if step_cfg.objective == "dpo":
            return losses.dpo_pair_loss(
                logp, mb.ref_logp_bt, mb.mask_bt, beta=step_cfg.beta, valid_b=mb.valid_b
            )
        if step_cfg.objective == "rest":
            return losses.rest_loss(
                logp,
                mb.ref_logp_bt,
                mb.mask_bt,
                mb.reward_b,
                group_size=group,
                threshold=step_cfg.rest_threshold,
                valid_b=mb.valid_b,
                sample_bt=mb.sample_bt,
                self_ref_b=mb.self_ref_b,
            )
        return losses.mirror_descent_loss(
            logp,
            mb.ref_logp_bt,
            mb.mask_bt,
            mb.reward_b,
            group_size=group,
            tau=tau,
            normalize_by_length=step_cfg.normalize_by_length,
            valid_b=mb.valid_b,
            sample_bt=mb.sample_bt,
            self_ref_b=mb.self_ref_b,
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
            loss, metrics, grads = _accumulate(grad_fn, state.params, batch, step_cfg, mesh)
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
        # One sharding for every batch leaf (leading axis over the batch): a prefix that fits
        # batches with or without the optional packed-row fields.
        in_shardings=(s_shard, sharding.batch_sharding(mesh, 1)),
        out_shardings=(s_shard, sharding.replicated(mesh)),
        donate_argnums=0,
    )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled functions of one objective on one mesh, built once per phase."""

    optimizer: optax.GradientTransformation
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]]
    logprobs: Callable[[decoder.Params, jax.Array, jax.Array], jax.Array]
    mesh: Mesh

    def put(self, batch: Batch) -> Batch:
        """Returns a host batch (the same on every process) as arrays sharded over the batch."""
        return distributed.put(batch, batch_shardings(self.mesh, batch))


def make_trainer(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, step_cfg: StepConfig, mesh: Mesh
) -> Trainer:
    """Returns the jitted train step and per-token log-prob function for `cfg` on `mesh`."""
    rows = sharding.batch_sharding(mesh, 2)
    return Trainer(
        optimizer=optimizer,
        step=make_train_step(cfg, optimizer, step_cfg, mesh),
        logprobs=jax.jit(
            functools.partial(sequence_logprobs, cfg),
            in_shardings=(sharding.param_shardings(cfg, mesh), rows, rows),
            out_shardings=rows,
        ),
        mesh=mesh,
    )


def row_blocks(n: int, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (row indices, valid 1/0) blocks of exactly `rows` rows covering rows 0..n-1.

    The last block is filled up by repeating its first row with valid 0 (fixed shapes compile
    once; the padding repeats a whole real group, so group structure is kept).
    """
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows)
        valid = (idx < n).astype(np.float32)
        yield np.where(idx < n, idx, start), valid


def reference_logprobs(
    trainer: Trainer, params, tokens_bt: np.ndarray, segment_ids_bt: np.ndarray, *, rows: int
) -> np.ndarray:
    """Returns log π_θi of every token of every row [b, t], computed `rows` rows at a time."""
    out = np.zeros(tokens_bt.shape, np.float32)
    put = lambda x: distributed.put(x, sharding.batch_sharding(trainer.mesh, 2))
    for idx, valid in row_blocks(tokens_bt.shape[0], rows):
        logp = trainer.logprobs(params, put(tokens_bt[idx]), put(segment_ids_bt[idx]))
        logp = distributed.host_value(logp)
        out[idx[valid > 0]] = logp[valid > 0]
    return out


def checked_step(
    trainer: Trainer, state: TrainState, batch: Batch, *, where: str
) -> tuple[TrainState, dict[str, float]]:
    """Returns (state, metrics as floats) of one step; raises `FloatingPointError` naming
    `where` when the step was refused for a non-finite loss or gradient."""
    state, m = trainer.step(state, trainer.put(batch))
    if int(m["skipped"]):
        raise FloatingPointError(
            f"non-finite loss or gradient at {where}; the update was refused and the last "
            "checkpoint is intact"
        )
    return state, {key: float(v) for key, v in m.items()}
