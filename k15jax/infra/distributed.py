"""Multi-controller JAX: one global mesh over every process's devices, the same program on each.

A run on several processes (hosts, or several processes on one host) is started by the user's
launcher (a shell loop, SLURM, Kubernetes): every process runs the same command, and
`initialize` joins them through `jax.distributed.initialize`, from flags or from what JAX reads
itself (`JAX_COORDINATOR_ADDRESS`, a SLURM or Open MPI launch of several tasks, or with `auto`
any cluster JAX detects, such as Kubernetes with the `kubernetes` package).

Division of work (`run/loop.py`): every process holds the full host copy of each batch and feeds the
shards its own devices hold (`put`), runs every jitted step, and writes its shards of each
checkpoint (orbax). **Process 0 alone owns rollouts, scoring, the sampler and the logs**: the
prompt sampler, the replay buffer of partial rollouts and the metric history are one
sequential state, and generation scales on its own (a rollout engine is one vLLM engine or a
pool of servers), so the only traffic between trainer processes is what process 0 decides
(`from_main`: the packed batch and the state, a few MB per iteration) and the weights it hands to
the engine (`host_value`). A single process never serializes anything.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import jax
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run; all None: single process unless the
    environment names a coordinator (`JAX_COORDINATOR_ADDRESS`)."""

    coordinator_address: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # join through JAX's own cluster detection (e.g. Kubernetes, TPU pods)

    def __post_init__(self):
        n, i = self.num_processes, self.process_id
        if n is not None and n < 1:
            raise ValueError(f"num_processes={n} must be >= 1")
        if i is not None and (i < 0 or (n is not None and i >= n)):
            raise ValueError(f"process_id={i} must be in [0, num_processes={n})")

    @property
    def wanted(self) -> bool:
        """Whether this process should join a multi-process run: flags, `auto`,
        `JAX_COORDINATOR_ADDRESS`, or a SLURM / Open MPI launch of more than one task."""
        given = (self.coordinator_address, self.num_processes, self.process_id)
        env = os.environ
        launched = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env
        launched |= int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        return (
            self.auto
            or any(x is not None for x in given)
            or "JAX_COORDINATOR_ADDRESS" in env
            or launched
        )


def initialize(cfg: DistributedConfig) -> None:
    """Joins the multi-process run `cfg` describes (no-op for a single process).

    Must run before anything touches a JAX device. On CPU the collectives go through gloo.
    """
    if not cfg.wanted or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
    )


def is_main() -> bool:
    """Whether this is process 0 (rollouts, logs, files other than checkpoints)."""
    return jax.process_index() == 0


def multi() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    if multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def put(tree, shardings):
    """Returns `tree` placed by `shardings` (a matching tree of NamedSharding).

    Host arrays must hold the same value on every process; each process transfers only the
    shards its own devices hold. Arrays already on devices are copied (never aliased: steps
    donate their state).
    """

    def one(x, s):
        if isinstance(x, jax.Array):
            return jax.device_put(x, s, may_alias=False)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def host_value(tree):
    """Returns `tree` as host numpy arrays, whole, on every process (a collective when arrays
    span processes: every process must call it)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def from_main(compute):
    """Returns `compute()` run on process 0, on every process; `compute` must return
    `(arrays, meta)`: a dict of numpy arrays and JSON data. Single process: no copy at all."""
    if not multi():
        return compute()
    from jax.experimental import multihost_utils

    payload = np.zeros((0,), np.uint8)
    if is_main():
        arrays, meta = compute()
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        payload = np.frombuffer(buf.getvalue(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(payload.size, np.int64)))
    if not is_main():
        payload = np.zeros((size,), np.uint8)
    payload = np.asarray(multihost_utils.broadcast_one_to_all(payload))
    with np.load(io.BytesIO(payload.tobytes()), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
        meta = json.loads(npz["__meta__"].tobytes().decode())
    return arrays, meta
