"""The long-context memory plan: what one train step needs at 8k, 32k and 128k tokens.

  python -m experiments.benchmarks.memory_plan  # any machine: compiles, runs nothing (~5 min, CPU)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.benchmarks.memory_plan \
      --which=meshes                       # per-device state by mesh, from shardings (seconds)

Temporary memory of one full train step (log-probs + mirror-descent loss + gradients + AdamW
update, remat on) of a Qwen2.5-0.5B-shaped model (bf16, tied embeddings), read from
`jax.jit(step).lower(...).compile().memory_analysis()`, for (a) `xla` attention + full logits
and (b) `xla_chunked` attention + chunked log-probs; plus the state (params + optimizer moments)
and whether it fits one 141 GB GPU. Printed as a table and written as JSON to --out.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from k15jax.infra import atomic
from k15jax.model import config

_OUT = flags.DEFINE_string("out", "runs/memory_plan.json", "Where to write the results.")
_LENGTHS = flags.DEFINE_list("memory_lengths", ["8192", "32768", "131072"], "Tokens.")
_WHICH = flags.DEFINE_list("which", ["lengths", "meshes"], "Tables: lengths, meshes.")
MESHES = ((8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (1, 2, 4), (1, 1, 8))
GPU_BYTES = 141e9


def train_step_memory(t: int, plan: str) -> dict:
    """Compiles one train step at t tokens and returns its memory analysis in bytes."""
    import jax
    import jax.numpy as jnp

    from k15jax.model import decoder, sharding
    from k15jax.train import train_step

    impl = {"a": ("xla", "xla"), "b": ("xla_chunked", "xla_chunked")}[plan]
    from k15jax.model.config import KernelConfig

    kernels = KernelConfig(
        attention_impl=impl[0], logprob_impl=impl[1], logprob_chunk=1024, remat=True
    )
    cfg = config.qwen25_05b(kernels=kernels)
    step_cfg = train_step.StepConfig(tau=0.1, group_size=1)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt = train_step.make_optimizer(1e-6)
    step = train_step.make_train_step(cfg, opt, step_cfg, mesh)
    state = jax.eval_shape(
        lambda p: train_step.init_state(p, cfg, opt, mesh), decoder.abstract_params(cfg)
    )
    shape = lambda s, d: jax.ShapeDtypeStruct(s, d)
    batch = train_step.Batch(
        tokens_bt=shape((1, t), jnp.int32), mask_bt=shape((1, t), jnp.float32),
        ref_logp_bt=shape((1, t), jnp.float32), reward_b=shape((1,), jnp.float32),
        segment_ids_bt=shape((1, t), jnp.int32), valid_b=shape((1,), jnp.float32),
    )  # fmt: skip
    start = time.perf_counter()
    ma = step.lower(state, batch).compile().memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return dict(
        t=t, plan=plan, attention=impl[0], logprobs=impl[1],
        temp_bytes=int(ma.temp_size_in_bytes), state_bytes=int(state_bytes),
        argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
        compile_s=time.perf_counter() - start,
    )  # fmt: skip


def run_memory() -> list[dict]:
    rows = []
    for t in (int(x) for x in _LENGTHS.value):
        for plan in ("a", "b"):
            r = train_step_memory(t, plan)
            r["fits_141GB"] = r["temp_bytes"] + r["state_bytes"] <= GPU_BYTES
            rows.append(r)
            print(f"  t={t} plan ({plan}): temp {r['temp_bytes'] / 2**30:.2f} GiB "
                  f"(compile {r['compile_s']:.0f} s)", flush=True)  # fmt: skip
    print("\nMemory plan, one train step of a Qwen2.5-0.5B-shaped model (bf16, remat, b=1):")
    print("| t | (a) xla + full logits | (b) chunked + chunked log-probs | (a)/(b) | fits 141 GB |")
    print("|---|---|---|---|---|")
    by = {(r["t"], r["plan"]): r for r in rows}
    for t in sorted({r["t"] for r in rows}):
        a, b = by[(t, "a")], by[(t, "b")]
        gib = lambda r: f"{r['temp_bytes'] / 2**30:,.2f} GiB"
        fit = f"(a) {'yes' if a['fits_141GB'] else 'no'}, (b) {'yes' if b['fits_141GB'] else 'no'}"
        print(f"| {t:,} | {gib(a)} | {gib(b)} | {a['temp_bytes'] / b['temp_bytes']:.1f}x | {fit} |")
    state = rows[0]["state_bytes"]
    print(f"State (bf16 params + AdamW moments) {state / 2**30:.2f} GiB, counted in 'fits'.")
    return rows


def run_meshes() -> list[dict]:
    """Per-device bytes of the Qwen2.5-0.5B-shaped train state (bf16 params + AdamW moments) on
    8-device meshes, from the shardings alone (abstract arrays: nothing is allocated)."""
    import jax

    from k15jax.model import decoder, sharding
    from k15jax.train import preflight, train_step

    cfg = config.qwen25_05b()
    opt = train_step.make_optimizer(1e-6)
    devices = jax.devices()
    if len(devices) < 8:
        print("meshes: needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
        return []
    rows = []
    for shape in MESHES:
        mesh = sharding.make_mesh(shape, devices[:8])
        state, _ = preflight.abstract_step_inputs(cfg, opt, mesh, rows=8, seq_len=8)
        per = preflight._sharded_bytes(state.params), preflight._sharded_bytes(state.opt_state)
        total = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(decoder.abstract_params(cfg))
        )
        rows.append(dict(mesh=shape, params=per[0], opt=per[1], whole_params=total))
    print("\nPer-device state of a Qwen2.5-0.5B-shaped model (bf16 params and AdamW moments), "
          "8 devices:")  # fmt: skip
    print("| mesh (data, fsdp, tensor) | params / device | AdamW moments / device | params share |")
    print("|---|---|---|---|")
    for r in rows:
        mib = lambda b: f"{b / 2**20:,.1f} MiB"
        print(f"| {r['mesh']} | {mib(r['params'])} | {mib(r['opt'])} | "
              f"1/{r['whole_params'] / r['params']:.2f} |")  # fmt: skip
    return rows


def main(argv):
    del argv
    import jax

    results = dict(device=str(jax.devices()[0].device_kind))
    if "meshes" in _WHICH.value:
        results["meshes"] = run_meshes()
    if "lengths" in _WHICH.value:
        results["memory"] = run_memory()
    atomic.write_text(_OUT.value, json.dumps(results, indent=2, default=str))
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
