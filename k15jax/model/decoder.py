"""Flax NNX decoder compatible with Hugging Face Qwen2, Qwen3 and Llama checkpoints.

The NNX modules hold the structure; other code uses the pure functions `init`, `apply`,
`hidden_states` and `output_embedding`, which take `params` as a plain nested dict of arrays
(`nnx.to_pure_dict` layout) so they jit, shard, checkpoint and convert like any PyTree.

Every parameter names its logical axes (`sharding_names`); `k15jax.model.sharding` maps them to a
mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from k15jax.model.config import ModelConfig
from kernels import attention as attention_kernels

Params = dict


def _param(rngs: nnx.Rngs, shape, names, dtype, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std) (or ones when std is None) that names its logical axes."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), ("norm",), dtype, None)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out], the transpose of a torch Linear weight."""

    def __init__(self, d_in, d_out, names, *, bias: bool, dtype, rngs: nnx.Rngs, std=0.02):
        self.kernel = _param(rngs, (d_in, d_out), names, dtype, std)
        self.bias = (
            nnx.Param(jnp.zeros((d_out,), dtype), out_sharding=(names[1],), eager_sharding=False)
            if bias
            else None
        )

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.kernel[...], preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype)


def rotary(x_bthd, positions_bt, theta: float):
    """Applies rotary position embeddings in the half-split layout Hugging Face uses."""
    d = x_bthd.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, d]
    cos, sin = jnp.cos(angles).astype(x_bthd.dtype), jnp.sin(angles).astype(x_bthd.dtype)
    x1, x2 = x_bthd[..., : d // 2], x_bthd[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_bthd * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        h, k, d, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        bias = cfg.attention_bias
        self.q_proj = Linear(e, h * d, ("embed", "q_heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(e, k * d, ("embed", "kv_heads"), bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * d, e, ("q_heads", "embed"), bias=False, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x_bte, positions_bt, segment_ids_bt):
        cfg = self.cfg
        b, t, _ = x_bte.shape
        q = self.q_proj(x_bte).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x_bte).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x_bte).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary(q, positions_bt, cfg.rope_theta)
        k = rotary(k, positions_bt, cfg.rope_theta)
        out = attention_kernels.attention(
            q,
            k,
            v,
            causal=True,
            segment_ids_bt=segment_ids_bt,
            impl=cfg.kernels.attention_impl,
            blocks=attention_kernels.BlockSizes(
                block_q=cfg.kernels.attention_block, block_k=cfg.kernels.attention_block
            ),
        )  # [b, t, h, d]
        return self.o_proj(out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim))


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(e, f, ("embed", "mlp"), bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(e, f, ("embed", "mlp"), bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, e, ("mlp", "embed"), bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = Mlp(cfg, dtype, rngs)

    def __call__(self, x, positions_bt, segment_ids_bt):
        x = x + self.attn(self.input_norm(x), positions_bt, segment_ids_bt)
        return x + self.mlp(self.post_attn_norm(x))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.embed = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, 0.02
        )
        self.layers = nnx.List([Layer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype, 0.02
            )
        self.cfg = cfg

    def __call__(self, tokens_bt, positions_bt, segment_ids_bt):
        """Returns the final-norm hidden states [b, t, embed]."""
        x = jnp.take(self.embed[...], tokens_bt, axis=0)
        if self.cfg.kernels.remat:
            x = self._remat_layers(x, positions_bt, segment_ids_bt)
        else:
            for layer in self.layers:
                x = layer(x, positions_bt, segment_ids_bt)
        return self.final_norm(x)

    def _remat_layers(self, x_bte, positions_bt, segment_ids_bt):
        """Applies the layers as a scan over their stacked weights, each step rematerialized.

        A loop of checkpointed layers leaves the schedule to XLA, whose CPU scheduler hoists
        the recomputation into the forward pass and keeps every layer's activations (measured
        with `memory_analysis`); inside a scan the backward recomputes one layer per step, so
        activation memory is one layer's on every backend. Costs one stacked copy of the
        layer weights.
        """
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(lyr) for lyr in self.layers])

        def body(x, state):
            return nnx.merge(graphdef, state)(x, positions_bt, segment_ids_bt), None

        x_bte, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x_bte, stacked)
        return x_bte


@functools.lru_cache(maxsize=32)
def _graphdef(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))[0]


def init(cfg: ModelConfig, key: jax.Array) -> Params:
    """Returns freshly initialized parameters (normal std 0.02, norms at one) as a pure dict."""
    return nnx.to_pure_dict(nnx.state(Decoder(cfg, nnx.Rngs(params=key)), nnx.Param))


def abstract_params(cfg: ModelConfig) -> Params:
    """Returns the parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init(cfg, jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> Params:
    """Returns, for every parameter, the tuple of logical axis names its dimensions carry."""
    state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))), nnx.Param)
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: tuple(v.get_metadata()["out_sharding"]),
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def default_positions(
    segment_ids_bt: Int[Array, "b t"] | None, b: int, t: int
) -> Int[Array, "b t"]:
    """Returns positions 0, 1, ... that restart at every segment boundary of a packed row."""
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
        return idx
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def hidden_states(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "b t"],
    *,
    positions: Int[Array, "b t"] | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
) -> Float[Array, "b t e"]:
    """Returns the final-norm hidden states [b, t, hidden] (`output_embedding` gives logits)."""
    b, t = tokens.shape
    if positions is None:
        positions = default_positions(segment_ids, b, t)
    model = nnx.merge(_graphdef(cfg), params)
    return model(tokens, positions, segment_ids)


def output_embedding(cfg: ModelConfig, params: Params) -> Float[Array, "e v"]:
    """Returns the [hidden, vocab] matrix that maps hidden states to logits (tied or not)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def apply(
    cfg: ModelConfig,
    params: Params,
    tokens: Int[Array, "b t"],
    *,
    positions: Int[Array, "b t"] | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
) -> Float[Array, "b t v"]:
    """Returns float32 next-token logits [b, t, vocab].

    Args:
      cfg: the model configuration.
      params: parameters as returned by `init` or `convert.load_hf`.
      tokens: token ids.
      positions: rotary positions; default 0.. per row, restarting at each segment.
      segment_ids: packed-sequence ids; tokens attend only within their segment.
    """
    h_bte = hidden_states(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
    return jnp.einsum(
        "bte,ev->btv", h_bte, output_embedding(cfg, params), preferred_element_type=jnp.float32
    )
