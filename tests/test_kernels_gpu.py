"""The Triton kernels compiled for a GPU (marker `gpu`, deselected by default).

  JAX_PLATFORMS=cuda TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_gpu.py

`impl="triton"` through jax-triton when it is installed; the same kernels launched on torch
CUDA tensors otherwise. Both against the pure-jnp references, values and gradients.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import attention, reference
from kernels import logprobs as kernel_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1"),
]
HAS_JAX_GPU = any(d.platform == "gpu" for d in jax.devices()) if jax.devices() else False
HAS_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None


def _inputs(b, t, h, kv, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), dtype)
    k = jax.random.normal(keys[1], (b, t, kv, d), dtype)
    v = jax.random.normal(keys[2], (b, t, kv, d), dtype)
    do = jax.random.normal(keys[3], (b, t, h, d), dtype)
    return q, k, v, do


def _segments(b, t):
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3 :] = 2
    seg[0, t - 7 :] = 0
    return jnp.asarray(seg)


@pytest.mark.skipif(not (HAS_JAX_GPU and HAS_JAX_TRITON), reason="needs a GPU and jax-triton")
@pytest.mark.parametrize("causal,seg", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jax_triton_attention_matches_reference(causal, seg, dtype):
    b, t, h, kv, d = 2, 1000, 8, 2, 128
    q, k, v, do = _inputs(b, t, h, kv, d, dtype)
    s = _segments(b, t) if seg else None
    outs = {}
    for impl in ("xla", "triton"):
        f = lambda q, k, v, impl=impl: attention.attention(
            q, k, v, causal=causal, segment_ids_bt=s, impl=impl
        )
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        outs[impl] = [np.asarray(x, np.float32) for x in (out, *vjp(do))]
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == jnp.float32 else dict(rtol=2e-2, atol=3e-2)
    for name, got, want in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["xla"], strict=True):
        np.testing.assert_allclose(got, want, err_msg=name, **tol)


@pytest.mark.skipif(not (HAS_JAX_GPU and HAS_JAX_TRITON), reason="needs a GPU and jax-triton")
def test_jax_triton_logprobs_match_reference():
    kh, kw, ky, kd = jax.random.split(jax.random.key(1), 4)
    n, e, v = 777, 256, 5000
    h = jax.random.normal(kh, (n, e), jnp.float32)
    w = jax.random.normal(kw, (e, v), jnp.float32) / 16
    y = jax.random.randint(ky, (n,), 0, v)
    dl = jax.random.normal(kd, (n,))
    res = {}
    for impl in ("xla", "triton"):
        f = lambda h, w, impl=impl: kernel_logprobs.logprobs(h, w, y, impl=impl)
        out, vjp = jax.vjp(jax.jit(f), h, w)
        res[impl] = [np.asarray(x) for x in (out, *vjp(dl))]
    for got, want in zip(res["triton"], res["xla"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # tf32 dots on the GPU


def test_torch_launched_kernels_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    from kernels import triton_attention as ta

    b, t, h, kv, d = 2, 1000, 8, 2, 128
    q, k, v, do = (np.asarray(x) for x in _inputs(b, t, h, kv, d, jnp.float32))
    ref = lambda q, k, v: reference.attention(q, k, v, causal=True)
    want, vjp = jax.vjp(ref, q, k, v)
    want = [np.asarray(x) for x in (want, *vjp(jnp.asarray(do)))]
    tq, tk, tv, tdo = (torch.from_numpy(x).cuda() for x in (q, k, v, do))
    out, lse = ta.forward_torch(tq, tk, tv, None, causal=True, block_m=64, block_n=64)
    grads = ta.backward_torch(tq, tk, tv, None, out, lse, tdo, causal=True)
    for got, w in zip((out, *grads), want, strict=True):
        np.testing.assert_allclose(got.cpu().numpy(), w, rtol=1e-3, atol=1e-3)  # tf32 dots
