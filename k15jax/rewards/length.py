"""The k1.5 length reward (§2.3.3) and its combination with the task reward.

Pure numpy-compatible JAX: works on host arrays and inside jit alike.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def length_reward(
    lengths_b: Int[Array, " b"], correct_b: Bool[Array, " b"], *, group_size: int
) -> Float[Array, " b"]:
    """Returns each response's length reward within its group of `group_size` consecutive rows.

    λ = 0.5 - (len - min_len) / (max_len - min_len), min and max over all responses of the
    group, correct or not; a correct response gets λ, an incorrect one min(0, λ); every
    response gets 0 when all lengths in the group are equal.
    """
    if lengths_b.shape[0] % group_size:
        raise ValueError(f"batch {lengths_b.shape[0]} is not a multiple of {group_size=}")
    lens = jnp.asarray(lengths_b, jnp.float32).reshape(-1, group_size)
    lo = lens.min(axis=1, keepdims=True)
    hi = lens.max(axis=1, keepdims=True)
    lam = jnp.where(hi > lo, 0.5 - (lens - lo) / jnp.maximum(hi - lo, 1.0), 0.0)
    correct = jnp.asarray(correct_b, bool).reshape(-1, group_size)
    return jnp.where(correct, lam, jnp.minimum(0.0, lam)).reshape(-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthPenaltyConfig:
    """Weight schedule of the length reward: 0 before `warmup_iterations`, then `weight`.

    The paper gives neither number (spec §2: GAP); it prescribes the step-function warm-up.
    """

    weight: float = 0.1
    warmup_iterations: int = 10

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight={self.weight} must be >= 0")
        if self.warmup_iterations < 0:
            raise ValueError(f"warmup_iterations={self.warmup_iterations} must be >= 0")


def length_weight(iteration: int, *, weight: float, warmup_iterations: int) -> float:
    """Returns w(iteration): 0 during the warm-up, `weight` from `warmup_iterations` on."""
    return weight if iteration >= warmup_iterations else 0.0


def total_reward(
    reward_b: Float[Array, " b"],
    lengths_b: Int[Array, " b"],
    correct_b: Bool[Array, " b"],
    *,
    group_size: int,
    weight: float,
) -> Float[Array, " b"]:
    """Returns r + weight * length_reward (weight from `length_weight`)."""
    return jnp.asarray(reward_b, jnp.float32) + weight * length_reward(
        lengths_b, correct_b, group_size=group_size
    )
