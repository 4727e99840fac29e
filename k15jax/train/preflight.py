"""Memory pre-flight: will the train step fit on one device? Answered before any rollout.

`plan_step` compiles the train step for the configured shapes (nothing runs) and reads XLA's
per-device memory analysis: the state (params + optimizer moments, as sharded), the batch, and
the temporaries of the forward and backward pass. `check` compares their sum with the memory
the trainer may use on one device — the stated device memory minus what the colocated rollout
engine is configured to take, or JAX's own limit on a GPU — and refuses a run that will not fit,
naming the numbers and the settings that would shrink it. Where no limit is known (a CPU host
with no `device_memory_gb`) the check is skipped.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from k15jax.model import decoder, sharding
from k15jax.model.config import ModelConfig
from k15jax.train import train_step

GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreflightConfig:
    enabled: bool = True
    device_memory_gb: float | None = None  # one device's memory; None: JAX's limit (GPU)
    # Share of `device_memory_gb` the colocated rollout engine takes (vLLM's
    # gpu_memory_utilization on a shared GPU); 0 when the engine has devices of its own.
    engine_fraction: float = 0.0

    def __post_init__(self):
        if self.device_memory_gb is not None and self.device_memory_gb <= 0:
            raise ValueError(f"device_memory_gb={self.device_memory_gb} must be > 0")
        if not 0 <= self.engine_fraction < 1:
            raise ValueError(f"engine_fraction={self.engine_fraction} must be in [0, 1)")


class DoesNotFit(RuntimeError):
    """The train step needs more memory per device than the run may use."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one compiled train step."""

    what: str  # e.g. "RL step: 128 rows x 280 tokens"
    state_bytes: int  # params + optimizer state held by one device
    batch_bytes: int
    temp_bytes: int  # activations, gradients, XLA's scratch
    output_bytes: int  # outputs not aliased to the donated state

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.batch_bytes + self.temp_bytes + self.output_bytes

    def line(self) -> str:
        g = lambda b: f"{b / GIB:.3f} GiB"
        return (
            f"{self.what}: {g(self.total_bytes)} per device (state {g(self.state_bytes)}, "
            f"batch {g(self.batch_bytes)}, temporaries {g(self.temp_bytes)})"
        )


def _sharded_bytes(abstract) -> int:
    """Bytes one device holds of the ShapeDtypeStructs `abstract` (with shardings)."""
    total = 0
    for x in jax.tree.leaves(abstract):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def plan_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    step_cfg: train_step.StepConfig,
    mesh,
    *,
    rows: int,
    seq_len: int,
    what: str,
) -> MemoryPlan:
    """Compiles the train step for `rows` x `seq_len` on `mesh`; returns its per-device plan."""
    return compile_step(cfg, optimizer, step_cfg, mesh, rows=rows, seq_len=seq_len, what=what)[1]


def abstract_step_inputs(cfg, optimizer, mesh, *, rows: int, seq_len: int):
    """Returns (TrainState, Batch) of ShapeDtypeStructs with the step's shardings."""
    shardings = train_step.state_shardings(cfg, optimizer, mesh)
    shapes = jax.eval_shape(
        lambda p: train_step.TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)
        ),
        decoder.abstract_params(cfg),
    )
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    bt, b = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    spec = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    batch = train_step.Batch(
        tokens_bt=spec((rows, seq_len), jnp.int32, bt),
        mask_bt=spec((rows, seq_len), jnp.float32, bt),
        ref_logp_bt=spec((rows, seq_len), jnp.float32, bt),
        reward_b=spec((rows,), jnp.float32, b),
        segment_ids_bt=spec((rows, seq_len), jnp.int32, bt),
        valid_b=spec((rows,), jnp.float32, b),
    )
    return state, batch


def compile_step(cfg, optimizer, step_cfg, mesh, *, rows: int, seq_len: int, what: str):
    """`plan_step` that also returns the compiled step: (executable, MemoryPlan)."""
    state, batch = abstract_step_inputs(cfg, optimizer, mesh, rows=rows, seq_len=seq_len)
    step = train_step.make_train_step(cfg, optimizer, step_cfg, mesh)
    compiled = step.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    plan = MemoryPlan(
        what=what,
        state_bytes=_sharded_bytes(state),
        batch_bytes=_sharded_bytes(batch),
        temp_bytes=int(ma.temp_size_in_bytes),
        output_bytes=max(0, int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)),
    )
    return compiled, plan


def available_bytes(cfg: PreflightConfig) -> tuple[int | None, str]:
    """Returns (bytes the trainer may use on one device or None if unknown, how it was found)."""
    if cfg.device_memory_gb is not None:
        total = cfg.device_memory_gb * GIB
        engine = cfg.engine_fraction * total
        how = f"device {total / GIB:.3f} GiB minus the rollout engine's {engine / GIB:.3f} GiB"
        return int(total - engine), how
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        how = "JAX's limit on the device (XLA_PYTHON_CLIENT_MEM_FRACTION)"
        return int(stats["bytes_limit"]), how
    return None, "no device memory limit known (set device_memory_gb)"


def suggestions(cfg: ModelConfig, mesh, plan: MemoryPlan, micro_batches: int) -> list[str]:
    """Returns the settings that would shrink `plan`, each with what it would change."""
    k = cfg.kernels
    out = []
    if not k.remat:
        out.append("--remat (activations of one layer at a time in the backward pass)")
    if k.attention_impl in ("xla", "xla_blocked"):
        out.append("--attention_impl=xla_chunked (no t x t attention scores)")
    if k.logprob_impl == "xla":
        out.append("--logprob_impl=xla_chunked (no full t x vocab logits)")
    out.append(
        f"--micro_batches={2 * micro_batches} (half the rows per forward/backward pass; "
        "temporaries shrink with the rows)"
    )
    fsdp = mesh.shape["fsdp"]
    out.append(
        f"a mesh with fsdp:{2 * fsdp} (state {plan.state_bytes / GIB:.3f} -> "
        f"~{plan.state_bytes / 2 / GIB:.3f} GiB per device; needs the devices)"
    )
    return out


def check(
    cfg: PreflightConfig, plans: list[MemoryPlan], model_cfg: ModelConfig, mesh, micro_batches: int
) -> str:
    """Returns a one-line report; raises `DoesNotFit` naming the numbers and the fixes."""
    limit, how = available_bytes(cfg)
    lines = [p.line() for p in plans]
    if limit is None:
        return "memory pre-flight: " + "; ".join(lines) + f"; not checked: {how}"
    worst = max(plans, key=lambda p: p.total_bytes)
    if worst.total_bytes > limit:
        fixes = "; ".join(suggestions(model_cfg, mesh, worst, micro_batches))
        raise DoesNotFit(
            f"memory pre-flight: the train step will not fit. {worst.line()}, but "
            f"{limit / GIB:.3f} GiB are available ({how}). Settings that shrink it: {fixes}"
        )
    return "memory pre-flight: " + "; ".join(lines) + f"; fits in {limit / GIB:.3f} GiB ({how})"
