"""The one token log-prob dispatch: log softmax(h w)[y] per row, implementations by name.

| impl          | memory    | runs on | what it is                                              |
|---------------|-----------|---------|---------------------------------------------------------|
| `xla`         | [n, v]    | any     | all logits at once (the reference)                      |
| `xla_chunked` | [c, v]    | any     | `kernels.chunked.logprobs`: c rows per rematerialized step |
| `triton`      | O(n + e v)| GPU     | `kernels.triton_logprobs`: fused, no logits array       |
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from kernels import chunked, reference

IMPLS = ("xla", "xla_chunked", "triton")


def logprobs(
    h_ne: Float[Array, "n e"],
    w_ev: Float[Array, "e v"],
    y_n: Int[Array, " n"],
    *,
    impl: str = "xla_chunked",
    chunk_size: int = 1024,
) -> Float[Array, " n"]:
    """Returns float32 log softmax(h_ne @ w_ev)[y_n] for every row, by implementation `impl`.

    Args:
      h_ne: final hidden states, one row per position.
      w_ev: output embedding.
      y_n: the token id each row's log-prob is wanted for.
      impl: one of `IMPLS`.
      chunk_size: rows of logits per step of `xla_chunked`.
    """
    if impl == "xla":
        return reference.logprobs(h_ne, w_ev, y_n)
    if impl == "xla_chunked":
        if chunk_size < 1:
            raise ValueError(f"{chunk_size=} must be >= 1")
        return chunked.logprobs(h_ne, w_ev, y_n, chunk_size=chunk_size)
    if impl == "triton":
        from kernels import triton_logprobs  # imports triton; GPU path only

        return triton_logprobs.logprobs(h_ne, w_ev, y_n)
    raise ValueError(f"log-prob impl={impl!r} is not available; choose one of {IMPLS}")
