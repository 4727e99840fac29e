"""Pure-`jnp` reference implementations the faster paths are checked against.

Shape legend: b batch, t query tokens, s key tokens, h query heads, k key/value heads,
g query heads per key/value head (h = k * g), d head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def attention_mask(
    segment_ids_bt: Int[Array, "b t"] | None, t: int, *, causal: bool
) -> jax.Array | None:
    """Returns a boolean mask [b or 1, t, t]: True where query i may attend to key j.

    Packed sequences carry one segment id per token; tokens attend only inside their segment.
    Padding is its own segment (id 0 by convention) so that no row is fully masked.
    """
    mask = None
    if causal:
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if segment_ids_bt is not None:
        same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def logprobs(
    h_ne: Float[Array, "n e"], w_ev: Float[Array, "e v"], y_n: Int[Array, " n"]
) -> Float[Array, " n"]:
    """Returns float32 log softmax(h w)[y] per row from all [n, v] logits at once."""
    logits_nv = jnp.einsum("ne,ev->nv", h_ne, w_ev, preferred_element_type=jnp.float32)
    lse_n = jax.nn.logsumexp(logits_nv, axis=-1)
    picked_n = jnp.take_along_axis(logits_nv, y_n[:, None], axis=-1)[:, 0]
    return picked_n - lse_n


def attention(
    q_bthd: Float[Array, "b t h d"],
    k_btkd: Float[Array, "b t k d"],
    v_btkd: Float[Array, "b t k d"],
    *,
    causal: bool = True,
    segment_ids_bt: Int[Array, "b t"] | None = None,
) -> Float[Array, "b t h d"]:
    """Returns softmax(q k^T / sqrt(d)) v with grouped-query heads, f32 softmax; O(t^2) memory."""
    mask = attention_mask(segment_ids_bt, q_bthd.shape[1], causal=causal)
    return masked_attention(q_bthd, k_btkd, v_btkd, mask)


def masked_attention(
    q_bthd: Float[Array, "b t h d"],
    k_bskd: Float[Array, "b s k d"],
    v_bskd: Float[Array, "b s k d"],
    mask_bts: jax.Array | None,
) -> Float[Array, "b t h d"]:
    """Returns `attention` of t queries over s keys where the boolean `mask_bts` [b or 1, t, s]
    (None: every key) allows; f32 scores and softmax."""
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    q_btkgd = q_bthd.reshape(b, t, kv, h // kv, d)
    scores_bkgts = jnp.einsum(
        "btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(d))
    if mask_bts is not None:
        scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskd.dtype)
    out_btkgd = jnp.einsum(
        "bkgts,bskd->btkgd", probs_bkgts, v_bskd, preferred_element_type=jnp.float32
    )
    return out_btkgd.reshape(b, t, h, d).astype(q_bthd.dtype)
