"""Flash attention forward and backward in `triton.language`, launched from JAX or torch.

Layout: q [b, t, h, d], k and v [b, t, kv, d], contiguous; query head `h` reads key/value head
`h // (h / kv)` (grouped-query attention); optional int32 segment ids [b, t] keep packed
sequences apart. Softmax statistics and accumulators are float32 for bf16 and f32 inputs.

- forward: one program per (query tile, batch x head); online softmax over key tiles (only
  tiles at or below the diagonal when causal); writes out and the row log-sum-exp [b, h, t].
- backward: `_attn_bwd_dq` (one program per query tile and head, loops over key tiles) and
  `_attn_bwd_dkdv` (one program per key tile and key/value head, loops over its g query heads
  and the query tiles), recomputing probabilities from the saved log-sum-exp; no atomics, so
  the backward is deterministic. delta = rowsum(out * dout) is computed by the caller.

Argument order is inputs (scalars included) then outputs: jax-triton appends the output
buffers after every positional argument.

`DOT_F32` upcasts the operands of every `tl.dot` to float32. The interpreter launcher sets it
for bf16 inputs because Triton 3.9's interpreter multiplies the raw bf16 bit patterns in
`tl.dot` (its `create_dot` calls `np.matmul` on the uint16 storage); bf16 -> f32 is exact, so
the interpreter then computes what the GPU's bf16 x bf16 -> f32 tensor-core dot computes.
The GPU launcher leaves it off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

NEG = -1.0e30


@triton.jit
def _load_tile(X, b, rows, rows_ok, head, NH: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
               offs_d, d_ok, DOT_F32: tl.constexpr):  # fmt: skip
    """Loads X[b, rows, head, :] of a contiguous [b, T, NH, D] array as a [rows, BLOCK_D] tile."""
    x = tl.load(
        X + ((b * T + rows[:, None]) * NH + head) * D + offs_d[None, :],
        mask=rows_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(X, value, b, rows, rows_ok, head, NH: tl.constexpr, T: tl.constexpr,
                D: tl.constexpr, offs_d, d_ok):  # fmt: skip
    tl.store(
        X + ((b * T + rows[:, None]) * NH + head) * D + offs_d[None, :],
        value.to(X.dtype.element_ty),
        mask=rows_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _visible(SEG, b, offs_m, m_ok, offs_n, n_ok, T: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_SEG: tl.constexpr):  # fmt: skip
    """Returns the [m, n] mask of keys each query may attend to (bounds, causal, segments)."""
    ok = m_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_m[:, None] >= offs_n[None, :])
    if HAS_SEG:
        seg_q = tl.load(SEG + b * T + offs_m, mask=m_ok, other=-1)
        seg_k = tl.load(SEG + b * T + offs_n, mask=n_ok, other=-2)
        ok = ok & (seg_q[:, None] == seg_k[None, :])
    return ok


@triton.jit
def _attn_fwd(
    Q, K, V, SEG, scale, OUT, LSE,
    T: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kvh = h // (H // KV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = _load_tile(Q, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok, DOT_F32)
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = _load_tile(K, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
        v = _load_tile(V, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
        ok = _visible(SEG, b, offs_m, m_ok, offs_n, n_ok, T, CAUSAL, HAS_SEG)
        s = tl.where(ok, tl.dot(q, tl.trans(k)) * scale, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    _store_tile(OUT, acc / l_safe[:, None], b, offs_m, m_ok, h, H, T, D, offs_d, d_ok)
    tl.store(LSE + (b * H + h) * T + offs_m, m_i + tl.log(l_safe), mask=m_ok)


@triton.jit
def _probs_and_ds(q, k, v, do, lse, delta, ok, scale):
    """Recomputes a tile's probabilities p and the score gradient ds = p (do v^T - delta)."""
    p = tl.where(ok, tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return p, ds


@triton.jit
def _attn_bwd_dq(
    Q, K, V, SEG, DO, LSE, DELTA, scale, DQ,
    T: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kvh = h // (H // KV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = _load_tile(Q, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok, DOT_F32)
    do = _load_tile(DO, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok, DOT_F32)
    lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = T
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = _load_tile(K, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
        v = _load_tile(V, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
        ok = _visible(SEG, b, offs_m, m_ok, offs_n, n_ok, T, CAUSAL, HAS_SEG)
        _, ds = _probs_and_ds(q, k, v, do, lse, delta, ok, scale)
        dq += tl.dot(ds.to(k.dtype), k)
    _store_tile(DQ, dq * scale, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, SEG, DO, LSE, DELTA, scale, DK, DV,
    T: tl.constexpr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // KV
    kvh = tl.program_id(1) % KV
    G: tl.constexpr = H // KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < D
    k = _load_tile(K, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
    v = _load_tile(V, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(G):
        h = kvh * G + g
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q = _load_tile(Q, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok, DOT_F32)
            do = _load_tile(DO, b, offs_m, m_ok, h, H, T, D, offs_d, d_ok, DOT_F32)
            lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=m_ok, other=0.0)
            ok = _visible(SEG, b, offs_m, m_ok, offs_n, n_ok, T, CAUSAL, HAS_SEG)
            p, ds = _probs_and_ds(q, k, v, do, lse, delta, ok, scale)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _store_tile(DK, dk * scale, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok)
    _store_tile(DV, dv, b, offs_n, n_ok, kvh, KV, T, D, offs_d, d_ok)


def check_shapes(q_shape, k_shape, v_shape) -> None:
    """Raises ValueError unless q [b, t, h, d], k and v [b, t, kv, d] fit the kernels."""
    if len(q_shape) != 4 or tuple(k_shape) != tuple(v_shape) or len(k_shape) != 4:
        raise ValueError(f"q {q_shape}, k {k_shape}, v {v_shape}: want [b,t,h,d], [b,t,kv,d]")
    (b, t, h, d), (bk, tk, kv, dk) = q_shape, k_shape
    if (b, t, d) != (bk, tk, dk) or h % kv:
        raise ValueError(
            f"q {q_shape} and k {k_shape}: batch, length and head dim must agree and "
            f"heads {h} must be a multiple of kv heads {kv}"
        )


def meta(t: int, h: int, kv: int, d: int, *, causal: bool, has_seg: bool, dot_f32: bool,
         block_m: int, block_n: int) -> dict:  # fmt: skip
    """Returns the constexpr arguments shared by the three kernels."""
    return dict(
        T=t, H=h, KV=kv, D=d, CAUSAL=causal, HAS_SEG=has_seg, DOT_F32=dot_f32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip


# ---- torch launchers (Triton's interpreter on CPU, or a torch GPU) ----


def forward_torch(q, k, v, seg, *, causal: bool, block_m: int = 64, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """Returns (out [b, t, h, d], lse [b, h, t] float32) for torch tensors; seg may be None."""
    import torch

    check_shapes(q.shape, k.shape, v.shape)
    b, t, h, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    has_seg = seg is not None
    seg = torch.zeros((b, t), dtype=torch.int32, device=q.device) if seg is None else seg.int()
    out = torch.empty_like(q)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    mp = meta(t, h, k.shape[2], d, causal=causal, has_seg=has_seg,
              dot_f32=_dot_f32(q), block_m=block_m, block_n=block_n)  # fmt: skip
    _attn_fwd[(triton.cdiv(t, block_m), b * h)](
        q, k, v, seg, d**-0.5, out, lse, num_warps=num_warps, num_stages=num_stages, **mp
    )
    return out, lse


def backward_torch(q, k, v, seg, out, lse, dout, *, causal: bool, block_m: int = 64,
                   block_n: int = 64, num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """Returns (dq, dk, dv) for torch tensors, from the forward's out and lse."""
    import torch

    b, t, h, d = q.shape
    kv = k.shape[2]
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    has_seg = seg is not None
    seg = torch.zeros((b, t), dtype=torch.int32, device=q.device) if seg is None else seg.int()
    delta = (out.float() * dout.float()).sum(-1).permute(0, 2, 1).contiguous()  # [b, h, t]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mp = meta(t, h, kv, d, causal=causal, has_seg=has_seg,
              dot_f32=_dot_f32(q), block_m=block_m, block_n=block_n)  # fmt: skip
    scale = d**-0.5
    launch = dict(num_warps=num_warps, num_stages=num_stages)
    _attn_bwd_dq[(triton.cdiv(t, block_m), b * h)](
        q, k, v, seg, dout, lse, delta, scale, dq, **launch, **mp
    )
    _attn_bwd_dkdv[(triton.cdiv(t, block_n), b * kv)](
        q, k, v, seg, dout, lse, delta, scale, dk, dv, **launch, **mp
    )
    return dq, dk, dv


def _dot_f32(x) -> bool:
    import torch

    return x.device.type == "cpu" and x.dtype == torch.bfloat16


# ---- JAX binding (GPU; jax-triton is imported only here) ----


def _jax_triton():
    try:
        import jax_triton
    except ImportError as err:
        raise RuntimeError(
            "impl='triton' runs the kernels through jax-triton, which needs a CUDA build of "
            f"JAX and the [gpu] extra ({err}); on CPU use impl='xla_chunked'"
        ) from err
    return jax_triton


def attention(q_bthd, k_btkd, v_btkd, *, causal: bool, segment_ids_bt=None,
              block_m: int = 128, block_n: int = 64, num_warps: int = 4,
              num_stages: int = 2):  # fmt: skip
    """Returns flash attention [b, t, h, d] of JAX arrays on a GPU, differentiable."""
    check_shapes(q_bthd.shape, k_btkd.shape, v_btkd.shape)
    b, t = q_bthd.shape[:2]
    has_seg = segment_ids_bt is not None
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    static = (causal, has_seg, block_m, block_n, num_warps, num_stages)
    return _attention_vjp(q_bthd, k_btkd, v_btkd, seg.astype(jnp.int32), static)


def _jax_fwd(q, k, v, seg, static):
    causal, has_seg, block_m, block_n, num_warps, num_stages = static
    b, t, h, d = q.shape
    mp = meta(t, h, k.shape[2], d, causal=causal, has_seg=has_seg, dot_f32=False,
              block_m=block_m, block_n=block_n)  # fmt: skip
    out, lse = _jax_triton().triton_call(
        q, k, v, seg, d**-0.5,
        kernel=_attn_fwd,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        grid=(triton.cdiv(t, block_m), b * h),
        num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    return out, (q, k, v, seg, out, lse)


def _jax_bwd(static, res, dout):
    causal, has_seg, block_m, block_n, num_warps, num_stages = static
    q, k, v, seg, out, lse = res
    b, t, h, d = q.shape
    kv = k.shape[2]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    mp = meta(t, h, kv, d, causal=causal, has_seg=has_seg, dot_f32=False,
              block_m=block_m, block_n=block_n)  # fmt: skip
    jt = _jax_triton()
    dq = jt.triton_call(
        q, k, v, seg, dout, lse, delta, d**-0.5,
        kernel=_attn_bwd_dq,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(t, block_m), b * h),
        num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    dk, dv = jt.triton_call(
        q, k, v, seg, dout, lse, delta, d**-0.5,
        kernel=_attn_bwd_dkdv,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(triton.cdiv(t, block_n), b * kv),
        num_warps=num_warps, num_stages=num_stages, **mp,
    )  # fmt: skip
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_vjp(q, k, v, seg, static):
    return _jax_fwd(q, k, v, seg, static)[0]


_attention_vjp.defvjp(_jax_fwd, _jax_bwd)
