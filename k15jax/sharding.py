"""The one place that maps logical axis names to mesh axes.

The model names every parameter's axes (`model.logical_axes`); `LOGICAL_AXIS_RULES` maps each
name to a mesh axis of the `("data", "fsdp", "tensor")` mesh. A dimension that the mapped mesh
axes do not divide evenly stays replicated (small models on large meshes).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15jax import model
from k15jax.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch is split over both data-parallel axes

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH,
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "norm": None,
}


def make_mesh(shape: tuple[int, int, int] = (-1, 1, 1), devices=None) -> Mesh:
    """Returns a Mesh over `devices` (default all) with axes (data, fsdp, tensor).

    One entry of `shape` may be -1: it takes the remaining devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    given, shape = tuple(shape), list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {given} (data, fsdp, tensor) may hold at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape and len(devices) % known == 0:
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        need = f"a multiple of {known}" if -1 in given else str(known)
        raise ValueError(
            f"mesh {given} (data, fsdp, tensor) needs {need} devices; there are {len(devices)}"
        )
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
    """Returns how many ways the batch is split on `mesh` (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH)


def logical_to_spec(names: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Returns the PartitionSpec of an array with logical axis `names` and `shape` on `mesh`."""
    spec = []
    for name, dim in zip(names, shape):
        axes = LOGICAL_AXIS_RULES[name]
        if axes is None:
            spec.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else axes
        size = math.prod(mesh.shape[a] for a in axes_t)
        spec.append(axes if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*spec)


def param_specs(cfg: ModelConfig, mesh: Mesh):
    """Returns the PartitionSpec tree of the model parameters on `mesh`."""
    shapes = model.abstract_params(cfg)
    return jax.tree.map(
        lambda names, s: logical_to_spec(names, s.shape, mesh),
        model.logical_axes(cfg),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """Returns the NamedSharding tree of the model parameters on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(cfg, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Returns the sharding of an array whose leading axis is the batch."""
    return NamedSharding(mesh, PartitionSpec(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """Returns `params` placed on `mesh` by the rules."""
    return jax.device_put(params, param_shardings(cfg, mesh))
