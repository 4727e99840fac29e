"""The one attention dispatch that the model calls; implementations are chosen by name."""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from kernels import reference

IMPLS = ("xla",)


def attention(
    q_bthd: Float[Array, "b t h d"],
    k_btkd: Float[Array, "b t k d"],
    v_btkd: Float[Array, "b t k d"],
    *,
    causal: bool = True,
    segment_ids_bt: Int[Array, "b t"] | None = None,
    impl: str = "xla",
) -> Float[Array, "b t h d"]:
    """Returns multi-head attention output [b, t, h, d] computed by implementation `impl`.

    q has h heads, k and v have k heads with h % k == 0 (grouped-query attention).
    `segment_ids_bt` keeps packed sequences from attending to each other.
    """
    if q_bthd.shape[2] % k_btkd.shape[2]:
        raise ValueError(
            f"query heads {q_bthd.shape[2]} not a multiple of kv heads {k_btkd.shape[2]}"
        )
    if impl == "xla":
        return reference.attention(
            q_bthd, k_btkd, v_btkd, causal=causal, segment_ids_bt=segment_ids_bt
        )
    raise ValueError(f"attention impl={impl!r} is not available; choose one of {IMPLS}")
