"""A plain JAX sampler over `model.apply` (greedy or temperature): for tests and as a baseline.

Generation at scale is vLLM's job (`k15jax.rollout.engines`). This sampler recomputes the whole
fixed-size window each step (no KV cache), so one compilation serves every step; it is
O(new_tokens x window) and meant for short sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from k15jax.model import decoder
from k15jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Samples:
    """Generated continuations; rows follow the prompts, `tokens` right-padded with `pad_id`."""

    tokens: np.ndarray  # [b, n] int32 generated ids
    logprobs: np.ndarray  # [b, n] float32 log-prob of each generated id under the raw model
    lengths: np.ndarray  # [b] number of generated ids, the eos included
    finished: np.ndarray  # [b] bool: ended with eos (else cut at max_new_tokens)

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy"))
def _sample(
    cfg, params, prompt_bp, prompt_len_b, key, temperature, eos_id, *, max_new_tokens, greedy
):
    b, p = prompt_bp.shape
    window = p + max_new_tokens
    tokens = jnp.zeros((b, window), jnp.int32).at[:, :p].set(prompt_bp)
    # Prompts are left-padded: padding is segment 0, the sequence segment 1.
    seg = (jnp.arange(window)[None] >= (p - prompt_len_b)[:, None]).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    out_logp = jnp.zeros((b, max_new_tokens), jnp.float32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)

    def body(i, carry):
        tokens, out_logp, done, lengths = carry
        logits = decoder.apply(cfg, params, tokens, positions=pos, segment_ids=seg)
        logits_bv = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        logp_bv = jax.nn.log_softmax(logits_bv)
        if greedy:
            nxt = jnp.argmax(logits_bv, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), logits_bv / temperature)
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        lp = jnp.where(done, 0.0, jnp.take_along_axis(logp_bv, nxt[:, None], axis=1)[:, 0])
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, p + i, axis=1)
        out_logp = out_logp.at[:, i].set(lp)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | (nxt == eos_id)
        return tokens, out_logp, done, lengths

    tokens, out_logp, done, lengths = jax.lax.fori_loop(
        0, max_new_tokens, body, (tokens, out_logp, done, lengths)
    )
    return tokens[:, p:], out_logp, lengths, done


def generate(
    cfg: ModelConfig,
    params: decoder.Params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    pad_id: int = 0,
) -> Samples:
    """Returns continuations of `prompts`, greedy when `temperature == 0`.

    Args:
      cfg: the model configuration.
      params: model parameters.
      prompts: token-id lists, one per sample (repeat a prompt for several samples).
      max_new_tokens: cap on generated tokens per sample.
      eos_id: generation of a sample stops after this id.
      temperature: softmax temperature; 0 means argmax.
      key: PRNG key, required when temperature > 0.
      pad_id: filler after a sample's end in `Samples.tokens`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"{temperature=} must be >= 0")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    p = max(len(x) for x in prompts)
    prompt_bp = np.zeros((len(prompts), p), np.int32)
    for row, ids in zip(prompt_bp, prompts):
        row[p - len(ids) :] = ids
    lens = np.array([len(x) for x in prompts], np.int32)
    toks, logp, lengths, done = _sample(
        cfg,
        params,
        jnp.asarray(prompt_bp),
        jnp.asarray(lens),
        key if key is not None else jax.random.key(0),
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(eos_id),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
    toks, logp, lengths, done = jax.device_get((toks, logp, lengths, done))
    toks = np.where(np.arange(max_new_tokens)[None] < lengths[:, None], toks, pad_id)
    return Samples(
        tokens=toks.astype(np.int32),
        logprobs=np.asarray(logp),
        lengths=lengths,
        finished=np.asarray(done),
    )
