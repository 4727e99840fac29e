"""Blockwise attention and log-probs in plain JAX (`impl="xla_chunked"`): O(t) memory anywhere.

Attention is the flash-attention algorithm written with `lax.map` / `lax.scan` over tiles:
an online softmax forward that keeps only `out` and the row log-sum-exp, and a custom backward
that recomputes each tile's probabilities (one pass for dq, one for dk and dv). Neither pass
holds more than one [b, h, block_q, block_k] tile of scores. Tiles that a causal mask hides
entirely are skipped with `lax.cond`.

Shape legend as in `kernels.reference`; n flattened rows, e hidden size, v vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import reference

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) is 0 without inf - inf = nan


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _tile_mask(qpos, kpos, seg_q, seg_k, *, t: int, causal: bool, has_seg: bool):
    """Returns the boolean mask [b or 1, 1, 1, bq, bk] of one (query tile, key tile) pair."""
    mask = (kpos < t)[None, None, None, None, :] & (qpos < t)[None, None, None, :, None]
    if causal:
        mask = mask & (qpos[:, None] >= kpos[None, :])[None, None, None]
    if has_seg:
        mask = mask & (seg_q[:, :, None] == seg_k[:, None, :])[:, None, None]
    return mask


def _needed(qi, kj, *, bq: int, bk: int, causal: bool):
    """Whether key tile kj holds any key that query tile qi may see under the causal mask."""
    if not causal:
        return jnp.bool_(True)
    return kj * bk <= qi * bq + bq - 1


def _scores(q_tile, k_tile, scale):
    # q [b, bq, kv, g, d], k [b, bk, kv, d] -> [b, kv, g, bq, bk]
    return (
        jnp.einsum("bqkgd,bskd->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32) * scale
    )


def _tiles(x, block: int):
    """[b, t, ...] -> [n_tiles, b, block, ...] (t already padded to a multiple of block)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _untile(x_n):
    """[n_tiles, b, block, ...] -> [b, n_tiles * block, ...]."""
    x = jnp.moveaxis(x_n, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, static):
    return _flash_fwd(q, k, v, seg, static)[0]


def _flash_fwd(q, k, v, seg, static):
    t, causal, has_seg, bq, bk = static
    b, tp, kv, g, d = q.shape
    scale = 1.0 / float(d) ** 0.5
    q_n, seg_q_n = _tiles(q, bq), _tiles(seg, bq)
    k_n, v_n, seg_k_n = _tiles(k, bk), _tiles(v, bk), _tiles(seg, bk)
    nk = k_n.shape[0]

    def q_tile(args):
        # The barrier ties the tile index and ids to q: under jax.checkpoint + scan (the
        # model's remat), index-only values (masks) would otherwise count as "known" and be
        # precomputed and stored for every tile pair, O(t^2) (seen in memory_analysis).
        qi, q_t, sq = jax.lax.optimization_barrier(args)
        qpos = qi * bq + jnp.arange(bq)

        def k_step(carry, xs):
            kj, k_t, v_t, sk, _ = jax.lax.optimization_barrier((*xs, q_t))

            def update(carry):
                m, l_sum, acc = carry
                kpos = kj * bk + jnp.arange(bk)
                mask = _tile_mask(qpos, kpos, sq, sk, t=t, causal=causal, has_seg=has_seg)
                s = jnp.where(mask, _scores(q_t, k_t, scale), _NEG)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd",
                    p.astype(v_t.dtype),
                    v_t,
                    preferred_element_type=jnp.float32,
                )
                return m_new, l_sum * alpha + p.sum(-1), acc * alpha[..., None] + pv

            need = _needed(qi, kj, bq=bq, bk=bk, causal=causal)
            return jax.lax.cond(need, update, lambda c: c, carry), None

        init = (
            jnp.full((b, kv, g, bq), _NEG, jnp.float32),
            jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, d), jnp.float32),
        )
        (m, l_sum, acc), _ = jax.lax.scan(k_step, init, (jnp.arange(nk), k_n, v_n, seg_k_n))
        l_safe = jnp.where(l_sum > 0, l_sum, 1.0)
        out = acc / l_safe[..., None]  # [b, kv, g, bq, d]
        lse = m + jnp.log(l_safe)  # [b, kv, g, bq]
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), jnp.moveaxis(lse, 3, 1)

    out_n, lse_n = jax.lax.map(q_tile, (jnp.arange(q_n.shape[0]), q_n, seg_q_n))
    out, lse = _untile(out_n), _untile(lse_n)  # [b, tp, kv, g, d], [b, tp, kv, g]
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(static, res, do):
    t, causal, has_seg, bq, bk = static
    q, k, v, seg, out, lse = res
    b, tp, kv, g, d = q.shape
    scale = 1.0 / float(d) ** 0.5
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, tp, kv, g]
    q_n, do_n, seg_q_n = _tiles(q, bq), _tiles(do, bq), _tiles(seg, bq)
    lse_n, delta_n = _tiles(lse, bq), _tiles(delta, bq)
    k_n, v_n, seg_k_n = _tiles(k, bk), _tiles(v, bk), _tiles(seg, bk)
    nq, nk = q_n.shape[0], k_n.shape[0]

    def tile_grads(qi, kj, q_t, do_t, sq, lse_t, delta_t, k_t, v_t, sk):
        """Returns p and ds [b, kv, g, bq, bk] of one tile, recomputed from lse."""
        qpos, kpos = qi * bq + jnp.arange(bq), kj * bk + jnp.arange(bk)
        mask = _tile_mask(qpos, kpos, sq, sk, t=t, causal=causal, has_seg=has_seg)
        lse_bkgq = jnp.moveaxis(lse_t, 1, 3)
        p = jnp.where(mask, jnp.exp(_scores(q_t, k_t, scale) - lse_bkgq[..., None]), 0.0)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_t, v_t, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.moveaxis(delta_t, 1, 3)[..., None])
        return p, ds

    def dq_tile(args):
        qi, q_t, do_t, sq, lse_t, delta_t = args

        def k_step(dq, xs):
            kj, k_t, v_t, sk = xs

            def update(dq):
                _, ds = tile_grads(qi, kj, q_t, do_t, sq, lse_t, delta_t, k_t, v_t, sk)
                return dq + jnp.einsum(
                    "bkgqs,bskd->bqkgd",
                    ds.astype(k_t.dtype),
                    k_t,
                    preferred_element_type=jnp.float32,
                )

            need = _needed(qi, kj, bq=bq, bk=bk, causal=causal)
            return jax.lax.cond(need, update, lambda x: x, dq), None

        dq0 = jnp.zeros((b, bq, kv, g, d), jnp.float32)
        dq, _ = jax.lax.scan(k_step, dq0, (jnp.arange(nk), k_n, v_n, seg_k_n))
        return (dq * scale).astype(q.dtype)

    def dkv_tile(args):
        kj, k_t, v_t, sk = args

        def q_step(carry, xs):
            qi, q_t, do_t, sq, lse_t, delta_t = xs

            def update(carry):
                dk, dv = carry
                p, ds = tile_grads(qi, kj, q_t, do_t, sq, lse_t, delta_t, k_t, v_t, sk)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd",
                    p.astype(do_t.dtype),
                    do_t,
                    preferred_element_type=jnp.float32,
                )
                dk = dk + jnp.einsum(
                    "bkgqs,bqkgd->bskd",
                    ds.astype(q_t.dtype),
                    q_t,
                    preferred_element_type=jnp.float32,
                )
                return dk, dv

            need = _needed(qi, kj, bq=bq, bk=bk, causal=causal)
            return jax.lax.cond(need, update, lambda c: c, carry), None

        zeros = jnp.zeros((b, bk, kv, d), jnp.float32)
        xs = (jnp.arange(nq), q_n, do_n, seg_q_n, lse_n, delta_n)
        (dk, dv), _ = jax.lax.scan(q_step, (zeros, zeros), xs)
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = _untile(jax.lax.map(dq_tile, (jnp.arange(nq), q_n, do_n, seg_q_n, lse_n, delta_n)))
    dk_n, dv_n = jax.lax.map(dkv_tile, (jnp.arange(nk), k_n, v_n, seg_k_n))
    return dq, _untile(dk_n), _untile(dv_n), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(
    q_bthd: Float[Array, "b t h d"],
    k_btkd: Float[Array, "b t k d"],
    v_btkd: Float[Array, "b t k d"],
    *,
    causal: bool = True,
    segment_ids_bt: Int[Array, "b t"] | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> Float[Array, "b t h d"]:
    """Returns attention like `reference.attention`, computed tile by tile in O(t) memory.

    Tiles are `block_q` queries by `block_k` keys (clipped to the sequence length); t need not
    be a multiple of either. Softmax and accumulation are float32 for any input dtype.
    """
    b, t, h, d = q_bthd.shape
    kv = k_btkd.shape[2]
    bq, bk = min(block_q, t), min(block_k, t)
    multiple = bq * bk // _gcd(bq, bk)
    has_seg = segment_ids_bt is not None
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    q = _pad_to(q_bthd.reshape(b, t, kv, h // kv, d), 1, multiple)
    k, v = _pad_to(k_btkd, 1, multiple), _pad_to(v_btkd, 1, multiple)
    seg = _pad_to(seg.astype(jnp.int32), 1, multiple, value=-1)
    out = _flash(q, k, v, seg, (t, causal, has_seg, bq, bk))
    return out[:, :t].reshape(b, t, h, d)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def logprobs(
    h_ne: Float[Array, "n e"],
    w_ev: Float[Array, "e v"],
    y_n: Int[Array, " n"],
    *,
    chunk_size: int = 1024,
) -> Float[Array, " n"]:
    """Returns float32 log softmax(h w)[y] per row, `chunk_size` rows of logits at a time.

    Each chunk sits in a rematerialized scan body, so neither the forward nor the backward
    pass holds more than [chunk_size, v] logits.
    """
    n, e = h_ne.shape
    if chunk_size >= n:
        return reference.logprobs(h_ne, w_ev, y_n)
    chunks = -(-n // chunk_size)
    h = _pad_to(h_ne, 0, chunk_size).reshape(chunks, chunk_size, e)
    y = _pad_to(y_n, 0, chunk_size).reshape(chunks, chunk_size)
    body = jax.checkpoint(lambda _, xs: (None, reference.logprobs(xs[0], w_ev, xs[1])))
    _, logp = jax.lax.scan(body, None, (h, y))
    return logp.reshape(-1)[:n]
