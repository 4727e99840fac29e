"""Logit parity of k15jax.model.decoder with Hugging Face transformers, packing, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from k15jax.model import convert, decoder
from k15jax.model.config import KernelConfig, ModelConfig

ARCHS = ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"]


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_dirs, arch):
    path, hf = hf_dirs[arch]
    cfg, params = convert.load_hf(path)
    assert cfg.architecture == arch
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(decoder.apply(cfg, params, jnp.asarray(tokens)))
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_segments_match_separate_runs(hf_dirs, arch):
    path, hf = hf_dirs[arch]
    cfg, params = convert.load_hf(path)
    rng = np.random.default_rng(1)
    lengths = [5, 9, 3]
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    pad = 4
    tokens = np.concatenate(seqs + [np.zeros(pad, np.int64)])[None]
    segment_ids = np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)]
    )
    packed = np.asarray(
        decoder.apply(
            cfg, params, jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids[None], jnp.int32)
        )
    )[0]
    start = 0
    for seq in seqs:
        with torch.no_grad():
            want = hf(torch.tensor(seq[None])).logits.numpy()[0]
        assert _rel_err(packed[start : start + len(seq)], want) <= 1e-4
        start += len(seq)


def test_bfloat16_params_close_to_float32(hf_dirs):
    path, _ = hf_dirs["Qwen2ForCausalLM"]
    cfg32, p32 = convert.load_hf(path)
    cfg16, p16 = convert.load_hf(path, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    tokens = jnp.arange(12)[None] % cfg32.vocab_size
    apply = jax.jit(decoder.apply, static_argnums=0)  # op by op, bf16 took seconds per primitive
    a = apply(cfg32, p32, tokens)
    b = apply(cfg16, p16, tokens)
    assert b.dtype == jnp.float32
    # bf16 has 8 mantissa bits; logits of this scale agree to ~1e-2 (STYLE.md bf16 atol).
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-2)


def test_remat_gives_same_logits_and_grads():
    cfg = ModelConfig(qk_norm=True)
    remat_cfg = ModelConfig(qk_norm=True, kernels=KernelConfig(remat=True))
    params = decoder.init(cfg, jax.random.key(0))
    tokens = jnp.arange(10)[None]

    def loss(c, p):
        return jnp.mean(decoder.apply(c, p, tokens) ** 2)

    # Jitted: op by op, the remat path's scan and checkpoint compiled each primitive alone
    # (about a minute on two cores).
    la, ga = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
    lb, gb = jax.jit(jax.value_and_grad(lambda p: loss(remat_cfg, p)))(params)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    # atol 1e-7: the remat path scans over the layers, which reorders float32 sums (grads ~1e-2).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)


def test_logical_axes_cover_every_param():
    cfg = ModelConfig(attention_bias=True, qk_norm=True)
    axes = decoder.logical_axes(cfg)
    shapes = decoder.abstract_params(cfg)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for names, s in zip(flat_axes, flat_shapes):
        assert len(names) == len(s.shape)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="GPT2LMHeadModel")
