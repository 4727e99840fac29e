"""The one attention dispatch that the model calls; implementations are chosen by name.

| impl          | memory   | runs on | what it is                                                  |
|---------------|----------|---------|-------------------------------------------------------------|
| `xla`         | O(t^2)   | any     | `kernels.reference`: scores materialized, the reference     |
| `xla_blocked` | O(t^2)   | any     | causal: query blocks over their key prefixes only           |
| `xla_chunked` | O(t)     | any     | `kernels.chunked`: blockwise online softmax in plain JAX    |
| `triton`      | O(t)     | GPU     | `kernels.triton_attention` through jax-triton               |
| `cudnn`       | O(t)*    | GPU     | `jax.nn.dot_product_attention(implementation="cudnn")`      |

`xla_blocked` computes `kernels.reference.attention` without its masked upper triangle when
causal: the queries are cut into at most `PREFIX_BLOCKS` blocks and each block attends to the
keys up to its own end, an exact softmax over the same keys ((n + 1) / 2n of the square's flops
for n blocks). On the default run's rows (280 tokens, 5 blocks, 2-core CPU): attention forward
and backward 0.35 s instead of 0.72 s per layer of 64 rows, the whole RL step 10-15% faster
(BUILD.md, "Iteration throughput", gives the commit and the runs). Not the default: its float
rounding differs from the reference's, so a run with it takes another trajectory, and one seed
each does not say which method is better.

*With `segment_ids_bt`, `cudnn` is given a [b, 1, t, t] boolean mask (O(t^2)); its packed
sequence support is not public API in JAX.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels import chunked, reference

IMPLS = ("xla", "xla_blocked", "xla_chunked", "triton", "cudnn")
PREFIX_BLOCK = 64  # target query block of `xla_blocked` (tokens); a few blocks per row ...
PREFIX_BLOCKS = 8  # ... and never more than this many (each block is its own ops)
CPU_IMPLS = ("xla", "xla_blocked", "xla_chunked")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes of the blockwise implementations (static: each value compiles anew)."""

    block_q: int = 512  # xla_chunked query tile
    block_k: int = 512  # xla_chunked key tile
    triton_block_m: int = 128  # Triton query tile
    triton_block_n: int = 64  # Triton key tile
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name}={getattr(self, f.name)} must be >= 1")
        for name in ("triton_block_m", "triton_block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.dot tiles)")


def attention(
    q_bthd: Float[Array, "b t h d"],
    k_btkd: Float[Array, "b t k d"],
    v_btkd: Float[Array, "b t k d"],
    *,
    causal: bool = True,
    segment_ids_bt: Int[Array, "b t"] | None = None,
    impl: str = "xla",
    blocks: BlockSizes = BlockSizes(),
) -> Float[Array, "b t h d"]:
    """Returns multi-head attention output [b, t, h, d] computed by implementation `impl`.

    q has h heads, k and v have k heads with h % k == 0 (grouped-query attention).
    `segment_ids_bt` keeps packed sequences from attending to each other.
    """
    if q_bthd.shape[2] % k_btkd.shape[2]:
        raise ValueError(
            f"query heads {q_bthd.shape[2]} not a multiple of kv heads {k_btkd.shape[2]}"
        )
    if impl == "xla_blocked" and causal:
        return causal_prefix_blocks(q_bthd, k_btkd, v_btkd, segment_ids_bt=segment_ids_bt)
    if impl in ("xla", "xla_blocked"):
        return reference.attention(
            q_bthd, k_btkd, v_btkd, causal=causal, segment_ids_bt=segment_ids_bt
        )
    if impl == "xla_chunked":
        return chunked.attention(
            q_bthd, k_btkd, v_btkd, causal=causal, segment_ids_bt=segment_ids_bt,
            block_q=blocks.block_q, block_k=blocks.block_k,
        )  # fmt: skip
    if impl == "triton":
        from kernels import triton_attention  # imports triton; GPU path only

        return triton_attention.attention(
            q_bthd, k_btkd, v_btkd, causal=causal, segment_ids_bt=segment_ids_bt,
            block_m=blocks.triton_block_m, block_n=blocks.triton_block_n,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )  # fmt: skip
    if impl == "cudnn":
        mask = None
        if segment_ids_bt is not None:
            mask = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q_bthd, k_btkd, v_btkd, mask=mask, is_causal=causal, implementation="cudnn"
        )
    raise ValueError(f"attention impl={impl!r} is not available; choose one of {IMPLS}")


def causal_prefix_blocks(
    q_bthd: Float[Array, "b t h d"],
    k_btkd: Float[Array, "b t k d"],
    v_btkd: Float[Array, "b t k d"],
    *,
    segment_ids_bt: Int[Array, "b t"] | None = None,
    blocks: int | None = None,
) -> Float[Array, "b t h d"]:
    """Returns causal attention as `reference.attention` does, skipping the upper triangle.

    The t queries are cut into `blocks` near-equal blocks (default: ~`PREFIX_BLOCK` tokens
    each, at most `PREFIX_BLOCKS`); block [a, e) is `reference.attention`'s formula over keys
    [0, e) only, with the same causal and segment mask, so each softmax runs over the same
    keys as in the full square and the masked keys it leaves out weigh exactly 0 there.
    Work: (n + 1) / 2n of the square for n blocks.
    """
    t = q_bthd.shape[1]
    n = blocks or min(PREFIX_BLOCKS, max(1, round(t / PREFIX_BLOCK)))
    if n <= 1:
        return reference.attention(
            q_bthd, k_btkd, v_btkd, causal=True, segment_ids_bt=segment_ids_bt
        )
    bounds = [round(i * t / n) for i in range(n + 1)]
    outs = []
    for a, e in zip(bounds[:-1], bounds[1:]):
        mask = (jnp.arange(a, e)[:, None] >= jnp.arange(e)[None, :])[None]
        if segment_ids_bt is not None:
            mask = mask & (segment_ids_bt[:, a:e, None] == segment_ids_bt[:, None, :e])
        outs.append(reference.masked_attention(q_bthd[:, a:e], k_btkd[:, :e], v_btkd[:, :e], mask))
    return jnp.concatenate(outs, axis=1)
