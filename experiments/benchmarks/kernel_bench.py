"""GPU kernel speed (the memory plan is `experiments.benchmarks.memory_plan`).

  python -m experiments.benchmarks.kernel_bench          # on a GPU, about 6 minutes

Forward and forward+backward TFLOP/s of attention (`triton`, `cudnn`, `xla`,
  `xla_chunked`; causal, d = 128) at t = 4k..32k, and the log-prob kernels (`triton`,
  `xla_chunked`, `xla`) at Qwen2.5-0.5B's e and vocabulary, against an H200's ceilings
  (~790 TFLOP/s bf16 matmul, ~4.3 TB/s copy: `H200_TFLOPS`, `H200_TBPS`). Each case first
  checks its values against the reference on a small input; failures (out of memory, a broken
  cuDNN path) are recorded, not fatal. `triton_torch` launches the same Triton kernels on torch
  CUDA tensors (timed with CUDA synchronization): the kernels' own speed where jax-triton is not
  installed.

Results are printed as tables and written as JSON to --out.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from k15jax.infra import atomic

_OUT = flags.DEFINE_string("out", "runs/kernel_bench.json", "Where to write the results.")
_SPEED_LENGTHS = flags.DEFINE_list("speed_lengths", ["4096", "8192", "16384", "32768"], "Tokens.")
_IMPLS = flags.DEFINE_list(
    "impls", ["triton", "triton_torch", "cudnn", "xla", "xla_chunked"], "Attention impls."
)
_LOGPROB_IMPLS = flags.DEFINE_list(
    "logprob_impls", ["triton", "triton_torch", "xla_chunked", "xla"], "Log-prob impls."
)
_LOGPROB_ROWS = flags.DEFINE_list("logprob_rows", ["8192", "32768"], "Rows (tokens).")
_HEADS = flags.DEFINE_integer("heads", 16, "Attention heads of the speed benchmark.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim of the speed benchmark.")
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 32768, "b = this // t (min 1).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per case (the median is reported).")

# An H200's ceilings the ratios are taken against, measured outside this repository (no script
# here reproduces them): bf16 matmul TFLOP/s and device-to-device copy TB/s.
H200_TFLOPS = 790.0
H200_TBPS = 4.3


# ------------------------------------------------------------------------------ speed


def _time_torch(f) -> float:
    import torch

    f()  # compile + warm up
    f()
    times = []
    for _ in range(_REPEATS.value):
        torch.cuda.synchronize()
        start = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _torch_attention(b, t, h, d, seed):
    """Returns (fwd, fwd_bwd, tensors) closures over bf16 CUDA tensors for triton_torch."""
    import torch

    from kernels import triton_attention as ta

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(b, t, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
                   for _ in range(4))  # fmt: skip
    kw = dict(causal=True, block_m=128, block_n=64, num_warps=8, num_stages=2)
    fwd = lambda: ta.forward_torch(q, k, v, None, **kw)

    def fwd_bwd():
        out, lse = ta.forward_torch(q, k, v, None, **kw)
        return ta.backward_torch(q, k, v, None, out, lse, do, **kw)

    return fwd, fwd_bwd, (q, k, v, do)


def _check_torch_attention() -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import reference

    fwd, fwd_bwd, (q, k, v, do) = _torch_attention(2, 1000, 8, 128, seed=0)
    to_j = lambda x: jnp.asarray(x.float().cpu().numpy()).astype(jnp.bfloat16)
    ref = lambda q, k, v: reference.attention(q, k, v, causal=True)
    want_out, want_vjp = jax.vjp(ref, to_j(q), to_j(k), to_j(v))
    got = (fwd()[0], *fwd_bwd())
    err = 0.0
    for g, w in zip(got, (want_out, *want_vjp(to_j(do))), strict=True):
        diff = g.float().cpu().numpy() - np.asarray(w, np.float32)
        err = max(err, float(np.max(np.abs(diff))))
    return err


def _time(f, *args) -> float:
    import jax

    jax.block_until_ready(f(*args))  # compile + warm up
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _attention_fn(impl: str, cudnn_mask: bool):
    import jax.numpy as jnp

    from kernels import attention

    if impl == "cudnn" and cudnn_mask:
        import jax

        def f(q, k, v):
            t = q.shape[1]
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

        return f
    blocks = attention.BlockSizes(block_q=1024, block_k=1024)
    return lambda q, k, v: attention.attention(q, k, v, causal=True, impl=impl, blocks=blocks)


def _check_attention(impl: str, cudnn_mask: bool) -> float:
    """Returns the max abs error of impl vs the reference (values and gradients), bf16, t=1000."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import reference

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (2, 1000, 8, 128), jnp.bfloat16) for kk in keys)
    f = _attention_fn(impl, cudnn_mask)
    ref = lambda q, k, v: reference.attention(q, k, v, causal=True)
    got_out, got_vjp = jax.vjp(jax.jit(f), q, k, v)
    want_out, want_vjp = jax.vjp(jax.jit(ref), q, k, v)
    err = 0.0
    for g, w in zip((got_out, *got_vjp(do)), (want_out, *want_vjp(do)), strict=True):
        err = max(err, float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)))))
    return err


def run_attention_speed() -> list[dict]:
    import jax
    import jax.numpy as jnp

    h, d = _HEADS.value, _HEAD_DIM.value
    rows = []
    for impl in _IMPLS.value:
        cudnn_mask = False
        check = None
        try:
            check = (
                _check_torch_attention()
                if impl == "triton_torch"
                else _check_attention(impl, cudnn_mask)
            )
            if impl == "cudnn" and check > 0.1:
                raise ValueError(f"is_causal=True gives wrong values (max err {check:.3g})")
        except Exception as err:  # noqa: BLE001 (a broken backend is a result, not a crash)
            if impl != "cudnn":
                rows.append(dict(impl=impl, error=f"check: {type(err).__name__}: {err}"[:300]))
                print(f"  {impl}: check failed: {err}"[:300], flush=True)
                continue
            print(f"  cudnn is_causal=True failed ({str(err)[:120]}); using a causal mask")
            cudnn_mask = True
            try:
                check = _check_attention(impl, cudnn_mask)
            except Exception as err2:  # noqa: BLE001
                rows.append(dict(impl=impl, error=f"check: {type(err2).__name__}: {err2}"[:300]))
                continue
        for t in (int(x) for x in _SPEED_LENGTHS.value):
            b = max(1, _TOKENS_PER_BATCH.value // t)
            flops_fwd = 4 * b * h * t * t * d / 2  # causal: half the score matrix
            row = dict(impl=impl, t=t, b=b, h=h, d=d, check_max_err=check, cudnn_mask=cudnn_mask)
            try:
                if impl == "triton_torch":
                    tfwd, tbwd, _ = _torch_attention(b, t, h, d, seed=t)
                    row["fwd_s"] = _time_torch(tfwd)
                    row["fwd_bwd_s"] = _time_torch(tbwd)
                else:
                    keys = jax.random.split(jax.random.key(t), 3)
                    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in keys)
                    f = _attention_fn(impl, cudnn_mask)
                    loss = lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum()
                    row["fwd_s"] = _time(jax.jit(f), q, k, v)
                    # the gradient includes a forward
                    row["fwd_bwd_s"] = _time(jax.jit(jax.grad(loss, (0, 1, 2))), q, k, v)
                row["fwd_tflops"] = flops_fwd / row["fwd_s"] / 1e12
                row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_s"] / 1e12
            except Exception as err:  # noqa: BLE001 (out of memory is a result here)
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            tf = (row.get("fwd_tflops", float("nan")), row.get("fwd_bwd_tflops", float("nan")))
            msg = f"  {impl} t={t}: {tf[0]:.1f} / {tf[1]:.1f} TFLOP/s {row.get('error', '')}"
            print(msg[:200], flush=True)
    print(
        f"\nAttention, causal, bf16, h={h}, d={d}, b*t={_TOKENS_PER_BATCH.value} (FLOPs: fwd "
        f"2*b*h*t^2*d, fwd+bwd 3.5x that; ceiling {H200_TFLOPS:.0f} TFLOP/s):"
    )
    print("| impl | t | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd % of ceiling | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "fwd_bwd_tflops" in r:
            pct = 100 * r["fwd_bwd_tflops"] / H200_TFLOPS
            note = "causal mask" if r.get("cudnn_mask") else ""
            print(f"| {r['impl']} | {r['t']:,} | {r['fwd_tflops']:.1f} | "
                  f"{r['fwd_bwd_tflops']:.1f} | {pct:.0f}% | {note} |")  # fmt: skip
        else:
            print(f"| {r['impl']} | {r.get('t', '-')} | - | - | - | {r.get('error', '')[:80]} |")
    return rows


class _Timer:
    """A zero-argument call returning the result, and its median time over --repeats."""

    def __init__(self, call, torch_sync: bool):
        self.call, self.torch_sync = call, torch_sync

    def __call__(self):
        return self.call()

    def median_s(self) -> float:
        if self.torch_sync:
            return _time_torch(self.call)
        return _time(self.call)


def _logprob_timers(impl: str, h, w, y) -> tuple[_Timer, _Timer]:
    """Returns (forward, forward+backward) timers of log-prob implementation `impl`."""
    import jax
    import numpy as np

    from kernels import logprobs

    if impl == "triton_torch":
        import torch

        from kernels import triton_logprobs as tlp

        to_t = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to("cuda", torch.bfloat16)
        th, tw = to_t(h), to_t(w)
        ty = torch.from_numpy(np.asarray(y, np.int32)).cuda()
        dl = torch.ones(th.shape[0], device="cuda")
        kw = dict(block_m=64, block_v=128, block_e=64, num_warps=4, num_stages=2)
        fwd = lambda: tlp.forward_torch(th, tw, ty, **kw)[0].cpu().numpy()

        def fwd_bwd():
            _, lse = tlp.forward_torch(th, tw, ty, **kw)
            return tlp.backward_torch(th, tw, ty, lse, dl, **kw)

        return _Timer(fwd, True), _Timer(fwd_bwd, True)
    f = lambda h, w, y: logprobs.logprobs(h, w, y, impl=impl)
    fwd, bwd = jax.jit(f), jax.jit(jax.grad(lambda h, w, y: f(h, w, y).sum(), (0, 1)))
    return _Timer(lambda: fwd(h, w, y), False), _Timer(lambda: bwd(h, w, y), False)


def run_logprob_speed() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import reference

    e, v = 896, 151936
    rows = []
    for impl in _LOGPROB_IMPLS.value:
        kh, kw, ky = jax.random.split(jax.random.key(1), 3)
        h = jax.random.normal(kh, (1000, e), jnp.bfloat16)
        w = (jax.random.normal(kw, (e, v), jnp.float32) * e**-0.5).astype(jnp.bfloat16)
        y = jax.random.randint(ky, (1000,), 0, v)
        try:
            fwd, _ = _logprob_timers(impl, h, w, y)
            want = jax.jit(lambda h, w: reference.logprobs(h, w, y))(h, w)
            check = float(np.max(np.abs(np.asarray(fwd()) - np.asarray(want))))
        except Exception as err:  # noqa: BLE001
            rows.append(dict(impl=impl, error=f"check: {type(err).__name__}: {err}"[:300]))
            continue
        for n in (int(x) for x in _LOGPROB_ROWS.value):
            h = jax.random.normal(kh, (n, e), jnp.bfloat16)
            y = jax.random.randint(ky, (n,), 0, v)
            row = dict(impl=impl, n=n, e=e, v=v, check_max_err=check)
            # Unavoidable traffic: read h and w once, write the outputs (fwd: logp, lse).
            bytes_fwd = 2 * (n * e + e * v) + 8 * n
            try:
                fwd, fwd_bwd = _logprob_timers(impl, h, w, y)
                row["fwd_s"] = fwd.median_s()
                row["fwd_tflops"] = 2 * n * e * v / row["fwd_s"] / 1e12
                row["fwd_gbps"] = bytes_fwd / row["fwd_s"] / 1e9
                row["fwd_bwd_s"] = fwd_bwd.median_s()
                row["fwd_bwd_tflops"] = 6 * n * e * v / row["fwd_bwd_s"] / 1e12
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(f"  logprobs {impl} n={n}: {row.get('fwd_tflops', float('nan')):.1f} TFLOP/s "
                  f"{row.get('error', '')}"[:200], flush=True)  # fmt: skip
    print(f"\nToken log-probs, bf16, e={e}, v={v} (FLOPs: fwd 2nev, fwd+bwd 6nev; "
          f"ceilings {H200_TFLOPS:.0f} TFLOP/s, {H200_TBPS} TB/s):")  # fmt: skip
    print("| impl | n | fwd TFLOP/s | fwd GB/s (h, w read once) | fwd+bwd TFLOP/s | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "fwd_bwd_tflops" in r:
            print(f"| {r['impl']} | {r['n']:,} | {r['fwd_tflops']:.1f} | {r['fwd_gbps']:.0f} | "
                  f"{r['fwd_bwd_tflops']:.1f} | |")  # fmt: skip
        else:
            print(f"| {r['impl']} | {r.get('n', '-')} | - | - | - | {r.get('error', '')[:80]} |")
    return rows


def main(argv):
    del argv
    # JAX would otherwise take 75% of the GPU and leave torch (triton_torch) too little.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    results = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend())
    results["attention"] = run_attention_speed()
    results["logprobs"] = run_logprob_speed()
    atomic.write_text(_OUT.value, json.dumps(results, indent=2, default=str))
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
