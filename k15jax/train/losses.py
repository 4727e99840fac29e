"""Pure loss functions of the k1.5 recipe: token log-probs, mirror descent, ReST, SFT and DPO.

Shape legend: b batch (rows = samples; a group is `group_size` consecutive rows), t tokens,
e hidden size, v vocabulary. Token arrays are aligned with the sequence: `logp_bt[:, i]` is the
log-prob of token i given tokens < i, and `logp_bt[:, 0] = 0` (nothing predicts the first token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import logprobs as kernel_logprobs

Metrics = dict[str, jax.Array]


def _f32(x) -> jax.Array:
    """Upcasts to at least float32 (bfloat16 -> float32; float64 stays for precision tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def token_logprobs(
    hidden_bte: Float[Array, "b t e"],
    w_ev: Float[Array, "e v"],
    tokens_bt: Int[Array, "b t"],
    *,
    chunk_size: int | None = 1024,
    impl: str = "xla_chunked",
) -> Float[Array, "b t"]:
    """Returns float32 log p(tokens[:, i] | tokens[:, :i]) for every i, with 0 at i = 0.

    `impl` picks the implementation in `kernels.logprobs` ("xla", "xla_chunked", "triton").
    With "xla_chunked", logits are formed `chunk_size` rows at a time inside a rematerialized
    scan, so neither pass holds more than [chunk_size, v] of them; `chunk_size=None` there
    computes all logits at once (the same as "xla").

    Args:
      hidden_bte: final hidden states of the model for `tokens_bt`.
      w_ev: output embedding (`model.output_embedding`).
      tokens_bt: the token ids whose log-probs are wanted.
      chunk_size: rows (positions of all sequences) per chunk of "xla_chunked".
      impl: log-prob implementation.
    """
    b, t, e = hidden_bte.shape
    h_ne = hidden_bte[:, :-1].reshape(b * (t - 1), e)  # position i predicts token i + 1
    y_n = tokens_bt[:, 1:].reshape(b * (t - 1))
    if impl == "xla_chunked" and chunk_size is None:
        impl = "xla"
    logp = kernel_logprobs.logprobs(h_ne, w_ev, y_n, impl=impl, chunk_size=chunk_size or 1)
    return jnp.pad(logp.reshape(b, t - 1), ((0, 0), (1, 0)))


def group_baseline(reward_b: Float[Array, " b"], *, group_size: int) -> Float[Array, " b"]:
    """Returns each row's group mean reward r̄ (groups are `group_size` consecutive rows)."""
    if reward_b.shape[0] % group_size:
        raise ValueError(f"batch {reward_b.shape[0]} is not a multiple of {group_size=}")
    mean_g = reward_b.reshape(-1, group_size).mean(axis=1)
    return jnp.repeat(mean_g, group_size)


def mirror_descent_loss(
    logp_bt: Float[Array, "b t"],
    ref_logp_bt: Float[Array, "b t"],
    mask_bt: Float[Array, "b t"],
    reward_b: Float[Array, " b"],
    *,
    group_size: int,
    tau: float,
    normalize_by_length: bool = False,
    valid_b: Float[Array, " b"] | None = None,
    sample_bt: Int[Array, "r t"] | None = None,
    self_ref_b: Float[Array, " b"] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Returns the online-policy-mirror-descent surrogate loss and its metrics.

    loss = mean_j (r_j - r̄ - τ δ_j)² / (2τ),  δ_j = Σ_t mask (logp - ref_logp),
    r̄ the mean reward of j's group. Its gradient is the paper's Eq. 3 (k1.5 §2.3.2) with
    the sign of a loss to minimize: -(1/B) Σ_j [(r_j - r̄) ∇logπ_j - τ δ_j ∇δ_j].
    `ref_logp_bt` (π_{θ_i}) is a constant. Deviation (optional, off by default):
    `normalize_by_length` divides each sample's term by its token count, as open
    reimplementations do; the paper's loss is sequence-level. `valid_b` (1/0) drops padding
    groups (fixed batch shapes): means are taken over valid rows only.

    Packed rows (`packing`): the token arrays are [r, t] rows holding several samples, and
    `sample_bt` names each token's sample (an index into `reward_b`, b samples); δ_j sums the
    tokens of sample j wherever they lie. `self_ref_b` (1/0 per sample) takes π_{θ_i} of that
    sample from `logp_bt` itself (stop-gradient): right only while the params are θ_i (the
    iteration's first step), and it saves the separate reference pass for those samples. For
    such samples `ref_logp_bt` may carry the engine's sampling log-probs (NaN where it has none)
    and the metrics `engine_gap_mean/max` compare them with the trainer's.
    """
    if tau <= 0:
        raise ValueError(f"{tau=} must be > 0")
    mask = _f32(mask_bt)
    b = reward_b.shape[0]
    delta_b, metrics = _log_ratio(logp_bt, ref_logp_bt, mask, sample_bt, self_ref_b, b)
    reward_b = _f32(reward_b)
    adv_b = reward_b - group_baseline(reward_b, group_size=group_size)
    per_sample = (adv_b - tau * delta_b) ** 2 / (2 * tau)
    if normalize_by_length:
        per_sample = per_sample / jnp.maximum(_per_sample(mask, sample_bt, b), 1.0)
    valid = jnp.ones_like(reward_b) if valid_b is None else _f32(valid_b)
    n = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: jnp.sum(valid * x) / n
    metrics = {
        **metrics,
        "delta_mean": mean(delta_b),
        "delta_abs_mean": mean(jnp.abs(delta_b)),
        "advantage_mean": mean(adv_b),
        "advantage_abs_mean": mean(jnp.abs(adv_b)),
        "zero_variance_groups": _zero_variance_groups(reward_b, valid, group_size),
        "reward_mean": mean(reward_b),
    }
    return mean(per_sample), metrics


def rest_kept_b(
    reward_b: Float[Array, " b"], *, threshold: float, valid_b: Float[Array, " b"] | None = None
) -> Float[Array, " b"]:
    """Returns 1/0 per sample: the samples ReST learns from (valid, reward >= `threshold`)."""
    kept = (_f32(reward_b) >= threshold).astype(jnp.float32)
    return kept if valid_b is None else kept * (_f32(valid_b) > 0)


def rest_kept_tokens(
    mask_bt: Float[Array, "b t"],
    reward_b: Float[Array, " b"],
    *,
    threshold: float,
    valid_b: Float[Array, " b"] | None = None,
    sample_bt: Int[Array, "r t"] | None = None,
) -> jax.Array:
    """Returns the number of loss tokens of kept samples: what `rest_loss` is a mean over."""
    kept_b = rest_kept_b(reward_b, threshold=threshold, valid_b=valid_b)
    mask = _f32(mask_bt)
    return jnp.sum(mask * _per_token(kept_b, sample_bt, mask.shape))


def rest_loss(
    logp_bt: Float[Array, "b t"],
    ref_logp_bt: Float[Array, "b t"],
    mask_bt: Float[Array, "b t"],
    reward_b: Float[Array, " b"],
    *,
    group_size: int,
    threshold: float,
    valid_b: Float[Array, " b"] | None = None,
    sample_bt: Int[Array, "r t"] | None = None,
    self_ref_b: Float[Array, " b"] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Returns the ReST loss: the token-mean negative log-likelihood of the kept samples.

    loss = -Σ_j kept_j Σ_t mask logp / Σ_j kept_j Σ_t mask, kept_j = [r_j >= threshold]
    (0 when nothing is kept). ReST (Gulcehre et al. 2023, "Reinforced Self-Training"): its
    Improve step fine-tunes on the policy's own samples filtered by a reward threshold, by
    maximum likelihood. k1.5 §2.3.2 (Fig. 10) compares its mirror descent, which also pushes
    down wrong samples (negative gradients), against this baseline. Samples below the
    threshold and padding rows (`valid_b` 0) get exactly zero gradient; there is no reference
    term and no baseline. Deviations: one Grow/Improve round per k1.5 iteration on its fresh
    samples (no growing data set, no rising threshold schedule, no training from the base
    model each round: the policy and the run's optimizer reset carry on, as for mirror descent);
    a token-level mean over all kept tokens of the step, as `sft_loss`.

    `ref_logp_bt`, `group_size` and `self_ref_b` only feed the metrics the run reads from every
    step, with mirror descent's meanings: δ_j = Σ_t mask (logp - ref_logp) (how far the policy
    moved from π_{θ_i}; `self_ref_b` and packed rows `sample_bt` exactly as in
    `mirror_descent_loss`, with its `engine_gap_mean/max`) and the share of valid groups whose
    rewards are all equal. "kept_fraction": kept samples / valid samples.
    """
    mask = _f32(mask_bt)
    b = reward_b.shape[0]
    delta_b, metrics = _log_ratio(logp_bt, ref_logp_bt, mask, sample_bt, self_ref_b, b)
    reward_b = _f32(reward_b)
    valid = jnp.ones_like(reward_b) if valid_b is None else _f32(valid_b)
    kept_b = rest_kept_b(reward_b, threshold=threshold, valid_b=valid)
    tokens_bt = mask * _per_token(kept_b, sample_bt, mask.shape)  # [r, t]
    # `where`, not only the product: an unkept token's log-prob (even a non-finite one) never
    # reaches the loss or its gradient.
    logp_kept = jnp.where(tokens_bt > 0, _f32(logp_bt), 0.0)
    nll = -jnp.sum(tokens_bt * logp_kept) / jnp.maximum(jnp.sum(tokens_bt), 1.0)
    n = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: jnp.sum(valid * x) / n
    metrics = {
        **metrics,
        "nll": nll,
        "kept_fraction": jnp.sum(kept_b) / n,
        "delta_mean": mean(delta_b),
        "delta_abs_mean": mean(jnp.abs(delta_b)),
        "zero_variance_groups": _zero_variance_groups(reward_b, valid, group_size),
        "reward_mean": mean(reward_b),
    }
    return nll, metrics


def _log_ratio(logp_bt, ref_logp_bt, mask, sample_bt, self_ref_b, b: int):
    """Returns (δ_b = Σ_t mask (logp - sg(ref)) per sample, the engine-gap metrics).

    Samples marked in `self_ref_b` take their reference from `logp_bt` itself (see
    `mirror_descent_loss`); their `ref_logp_bt` is the engine's, compared in the metrics.
    """
    logp = _f32(logp_bt)
    ref = _f32(ref_logp_bt)
    metrics: Metrics = {}
    if self_ref_b is not None:
        own_bt = _per_token(_f32(self_ref_b), sample_bt, logp.shape) > 0
        known = own_bt & jnp.isfinite(ref) & (mask > 0)
        gap = jnp.where(known, jnp.abs(logp - jnp.nan_to_num(ref)), 0.0)
        metrics["engine_gap_mean"] = jnp.sum(gap) / jnp.maximum(jnp.sum(known), 1.0)
        metrics["engine_gap_max"] = jnp.max(gap)
        ref = jnp.where(own_bt, logp, jnp.nan_to_num(ref))
    ratio_bt = logp - jax.lax.stop_gradient(ref)
    return _per_sample(mask * ratio_bt, sample_bt, b), metrics


def _zero_variance_groups(reward_b, valid, group_size: int) -> jax.Array:
    """Returns the share of valid groups whose rewards are all equal (no advantage signal)."""
    groups = reward_b.reshape(-1, group_size)
    zero_var = jnp.all(groups == groups[:, :1], axis=1)
    valid_g = valid.reshape(-1, group_size)[:, 0]
    return jnp.sum(valid_g * zero_var) / jnp.maximum(valid_g.sum(), 1.0)


def _per_sample(x_bt, sample_bt, b: int) -> jax.Array:
    """Returns the sum of `x_bt` over each sample's tokens [b] (rows are samples without ids)."""
    if sample_bt is None:
        return jnp.sum(x_bt, axis=1)
    return jax.ops.segment_sum(x_bt.reshape(-1), sample_bt.reshape(-1), num_segments=b)


def _per_token(x_b, sample_bt, shape) -> jax.Array:
    """Returns the per-sample `x_b` spread over each sample's tokens [r, t]."""
    if sample_bt is None:
        return jnp.broadcast_to(x_b[:, None], shape)
    return x_b[sample_bt]


def sft_loss(
    logp_bt: Float[Array, "b t"], mask_bt: Float[Array, "b t"]
) -> tuple[jax.Array, Metrics]:
    """Returns the mean negative log-likelihood over masked tokens (token-level average)."""
    mask = mask_bt.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    nll = -jnp.sum(mask * logp_bt) / n
    return nll, {"nll": nll, "tokens": mask.sum()}


def dpo_loss(
    chosen_logp_b: Float[Array, " b"],
    rejected_logp_b: Float[Array, " b"],
    ref_chosen_logp_b: Float[Array, " b"],
    ref_rejected_logp_b: Float[Array, " b"],
    *,
    beta: float,
    valid_b: Float[Array, " b"] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Returns the DPO loss mean_b -log σ(β[(π_c - ref_c) - (π_r - ref_r)]) and its metrics.

    Rafailov et al. 2023 ("Direct Preference Optimization"), the objective k1.5 §2.4 uses for
    long2short, on sequence log-probs of b (chosen, rejected) pairs. The reference log-probs
    are constants (the frozen reference model). `valid_b` (1/0) drops padding pairs: means are
    over valid pairs only. Metrics: the mean margin β[...], the accuracy (share of pairs whose
    margin is positive) and the mean implicit rewards β(π - ref) of chosen and rejected.
    """
    if beta <= 0:
        raise ValueError(f"{beta=} must be > 0")
    chosen_b = _f32(chosen_logp_b) - jax.lax.stop_gradient(_f32(ref_chosen_logp_b))
    rejected_b = _f32(rejected_logp_b) - jax.lax.stop_gradient(_f32(ref_rejected_logp_b))
    margin_b = beta * (chosen_b - rejected_b)
    valid = jnp.ones_like(margin_b) if valid_b is None else _f32(valid_b)
    n = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: jnp.sum(valid * x) / n
    loss = mean(-jax.nn.log_sigmoid(margin_b))
    return loss, {
        "margin_mean": mean(margin_b),
        "accuracy": mean((margin_b > 0).astype(jnp.float32)),
        "chosen_reward": mean(beta * chosen_b),
        "rejected_reward": mean(beta * rejected_b),
    }


def dpo_pair_loss(
    logp_bt: Float[Array, "b t"],
    ref_logp_bt: Float[Array, "b t"],
    mask_bt: Float[Array, "b t"],
    *,
    beta: float,
    valid_b: Float[Array, " b"] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Returns `dpo_loss` of rows taken as pairs: row 2i is chosen, row 2i + 1 rejected.

    Each row's sequence log-prob is Σ_t mask · logp (the response tokens); a pair counts when
    its chosen row is valid (`valid_b`, 1/0; padding repeats whole pairs).
    """
    if logp_bt.shape[0] % 2:
        raise ValueError(f"batch {logp_bt.shape[0]} must be even: rows are (chosen, rejected)")
    mask = _f32(mask_bt)
    seq_p2 = jnp.sum(mask * _f32(logp_bt), axis=1).reshape(-1, 2)  # [pairs, 2]
    ref_p2 = jnp.sum(mask * _f32(ref_logp_bt), axis=1).reshape(-1, 2)
    valid = None if valid_b is None else _f32(valid_b).reshape(-1, 2)[:, 0]
    return dpo_loss(
        seq_p2[:, 0], seq_p2[:, 1], ref_p2[:, 0], ref_p2[:, 1], beta=beta, valid_b=valid
    )
