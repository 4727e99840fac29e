"""Fused token log-probs in `triton.language`: log softmax(h w)[y] without a [n, v] array.

Layout: h [n, e] (hidden states, one row per position), w [e, v] (output embedding), y [n]
int32 (the token each row predicts), all contiguous.

- forward: one program per tile of rows; for each vocabulary tile the logits tile is
  accumulated over e tiles with `tl.dot`, folded into a running log-sum-exp, and the logit of
  y is picked out. Writes logp [n] and lse [n] (float32).
- backward: one program per (row tile, vocabulary tile) recomputes its logits tile,
  forms g = dlogp * (onehot(y) - softmax) and adds g w^T into dh and h^T g into dw with
  float32 atomics (dh, dw zeroed by the caller). Summation order then varies between runs on
  a GPU, so gradients are reproducible to float32 rounding, not bit for bit.

`DOT_F32` as in `kernels.triton_attention` (the interpreter's bf16 `tl.dot` is broken).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from kernels.triton_attention import _jax_triton

NEG = -1.0e30


@triton.jit
def _load_hw(H, W, offs_m, m_ok, offs_e, e_ok, offs_v, v_ok, E: tl.constexpr, V: tl.constexpr,
             DOT_F32: tl.constexpr):  # fmt: skip
    """Loads the [m, e] tile of h and the [e, v] tile of w."""
    h = tl.load(H + offs_m[:, None] * E + offs_e[None, :],
                mask=m_ok[:, None] & e_ok[None, :], other=0.0)  # fmt: skip
    w = tl.load(W + offs_e[:, None] * V + offs_v[None, :],
                mask=e_ok[:, None] & v_ok[None, :], other=0.0)  # fmt: skip
    if DOT_F32:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    return h, w


@triton.jit
def _logits_tile(H, W, offs_m, m_ok, offs_v, v_ok,
                 E: tl.constexpr, V: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    logits = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for start_e in range(0, E, BLOCK_E):
        offs_e = start_e + tl.arange(0, BLOCK_E)
        h, w = _load_hw(H, W, offs_m, m_ok, offs_e, offs_e < E, offs_v, v_ok, E, V, DOT_F32)
        logits += tl.dot(h, w)
    return logits


@triton.jit
def _logprob_fwd(
    H, W, Y, LOGP, LSE,
    N: tl.constexpr, E: tl.constexpr, V: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    y = tl.load(Y + offs_m, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    picked = tl.zeros([BLOCK_M], tl.float32)
    for start_v in range(0, V, BLOCK_V):
        offs_v = start_v + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        logits = _logits_tile(H, W, offs_m, m_ok, offs_v, v_ok, E, V, DOT_F32,
                              BLOCK_M, BLOCK_V, BLOCK_E)  # fmt: skip
        logits = tl.where(v_ok[None, :], logits, NEG)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        p = tl.where(v_ok[None, :], tl.exp(logits - m_new[:, None]), 0.0)
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
        picked += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), 1)
    lse = m_i + tl.log(l_i)
    tl.store(LOGP + offs_m, picked - lse, mask=m_ok)
    tl.store(LSE + offs_m, lse, mask=m_ok)


@triton.jit
def _logprob_bwd(
    H, W, Y, LSE, DLOGP, DH, DW,
    N: tl.constexpr, E: tl.constexpr, V: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_ok = offs_m < N
    v_ok = offs_v < V
    y = tl.load(Y + offs_m, mask=m_ok, other=0)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
    dlogp = tl.load(DLOGP + offs_m, mask=m_ok, other=0.0)
    logits = _logits_tile(H, W, offs_m, m_ok, offs_v, v_ok, E, V, DOT_F32,
                          BLOCK_M, BLOCK_V, BLOCK_E)  # fmt: skip
    onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    g = dlogp[:, None] * (onehot - tl.exp(logits - lse[:, None]))
    g = tl.where(m_ok[:, None] & v_ok[None, :], g, 0.0)
    for start_e in range(0, E, BLOCK_E):
        offs_e = start_e + tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        h, w = _load_hw(H, W, offs_m, m_ok, offs_e, e_ok, offs_v, v_ok, E, V, DOT_F32)
        g_in = g.to(h.dtype)
        tl.atomic_add(DH + offs_m[:, None] * E + offs_e[None, :], tl.dot(g_in, tl.trans(w)),
                      mask=m_ok[:, None] & e_ok[None, :])  # fmt: skip
        tl.atomic_add(DW + offs_e[:, None] * V + offs_v[None, :], tl.dot(tl.trans(h), g_in),
                      mask=e_ok[:, None] & v_ok[None, :])  # fmt: skip


def check_shapes(h_shape, w_shape, y_shape) -> None:
    """Raises ValueError unless h [n, e], w [e, v], y [n]."""
    if len(h_shape) != 2 or len(w_shape) != 2 or tuple(y_shape) != (h_shape[0],):
        raise ValueError(f"h {h_shape}, w {w_shape}, y {y_shape}: want [n, e], [e, v], [n]")
    if h_shape[1] != w_shape[0]:
        raise ValueError(f"h {h_shape} and w {w_shape}: hidden sizes differ")


def meta(n: int, e: int, v: int, *, dot_f32: bool, block_m: int, block_v: int,
         block_e: int) -> dict:  # fmt: skip
    """Returns the constexpr arguments shared by both kernels."""
    return dict(N=n, E=e, V=v, DOT_F32=dot_f32, BLOCK_M=block_m, BLOCK_V=block_v,
                BLOCK_E=block_e)  # fmt: skip


# ---- torch launchers (Triton's interpreter on CPU, or a torch GPU) ----


def forward_torch(h, w, y, *, block_m: int = 64, block_v: int = 128, block_e: int = 64,
                  num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """Returns (logp [n], lse [n]) float32 for torch tensors."""
    import torch

    check_shapes(h.shape, w.shape, y.shape)
    n, e = h.shape
    v = w.shape[1]
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    mp = meta(n, e, v, dot_f32=_dot_f32(h), block_m=block_m, block_v=block_v, block_e=block_e)
    _logprob_fwd[(triton.cdiv(n, block_m),)](
        h.contiguous(),
        w.contiguous(),
        y.to(torch.int32).contiguous(),
        logp,
        lse,
        num_warps=num_warps,
        num_stages=num_stages,
        **mp,
    )
    return logp, lse


def backward_torch(h, w, y, lse, dlogp, *, block_m: int = 64, block_v: int = 128,
                   block_e: int = 64, num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """Returns (dh [n, e], dw [e, v]) in the dtypes of h and w."""
    import torch

    n, e = h.shape
    v = w.shape[1]
    dh = torch.zeros((n, e), dtype=torch.float32, device=h.device)
    dw = torch.zeros((e, v), dtype=torch.float32, device=h.device)
    mp = meta(n, e, v, dot_f32=_dot_f32(h), block_m=block_m, block_v=block_v, block_e=block_e)
    _logprob_bwd[(triton.cdiv(n, block_m), triton.cdiv(v, block_v))](
        h.contiguous(), w.contiguous(), y.to(torch.int32).contiguous(), lse,
        dlogp.float().contiguous(), dh, dw, num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    return dh.to(h.dtype), dw.to(w.dtype)


def _dot_f32(x) -> bool:
    import torch

    return x.device.type == "cpu" and x.dtype == torch.bfloat16


# ---- JAX binding (GPU; jax-triton is imported only here) ----


def logprobs(h_ne, w_ev, y_n, *, block_m: int = 64, block_v: int = 128, block_e: int = 64,
             num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """Returns float32 log softmax(h w)[y] [n] of JAX arrays on a GPU, differentiable."""
    check_shapes(h_ne.shape, w_ev.shape, y_n.shape)
    static = (block_m, block_v, block_e, num_warps, num_stages)
    return _logprobs_vjp(h_ne, w_ev, y_n.astype(jnp.int32), static)


def _jax_fwd(h, w, y, static):
    block_m, block_v, block_e, num_warps, num_stages = static
    (n, e), v = h.shape, w.shape[1]
    mp = meta(n, e, v, dot_f32=False, block_m=block_m, block_v=block_v, block_e=block_e)
    row = jax.ShapeDtypeStruct((n,), jnp.float32)
    logp, lse = _jax_triton().triton_call(
        h, w, y, kernel=_logprob_fwd, out_shape=[row, row], grid=(triton.cdiv(n, block_m),),
        num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    return logp, (h, w, y, lse)


def _jax_bwd(static, res, dlogp):
    block_m, block_v, block_e, num_warps, num_stages = static
    h, w, y, lse = res
    (n, e), v = h.shape, w.shape[1]
    mp = meta(n, e, v, dot_f32=False, block_m=block_m, block_v=block_v, block_e=block_e)
    dh, dw = _jax_triton().triton_call(
        h, w, y, lse, dlogp.astype(jnp.float32),
        kernel=_logprob_bwd,
        out_shape=[jax.ShapeDtypeStruct((n, e), jnp.float32),
                   jax.ShapeDtypeStruct((e, v), jnp.float32)],
        grid=(triton.cdiv(n, block_m), triton.cdiv(v, block_v)),
        zeroed_outputs=(0, 1),
        num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    return dh.astype(h.dtype), dw.astype(w.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logprobs_vjp(h, w, y, static):
    return _jax_fwd(h, w, y, static)[0]


_logprobs_vjp.defvjp(_jax_fwd, _jax_bwd)
