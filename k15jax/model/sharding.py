"""The one place that maps logical axis names to mesh axes.

The model names every parameter's axes (`model.logical_axes`); `LOGICAL_AXIS_RULES` maps each
name to a mesh axis of the `("data", "fsdp", "tensor")` mesh. A dimension that the mapped mesh
axes do not divide evenly stays replicated (small models on large meshes).

FSDP shards every parameter: one the rules leave without the `fsdp` axis (norm scales, biases,
a weight whose `embed` dimension `fsdp` does not divide) takes it on its largest dimension that
the axes already there times `fsdp` divide. With fsdp = n, each device holds 1/n of every
parameter and of its optimizer moments (`per_device_bytes`) wherever the shapes divide.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k15jax.infra import distributed
from k15jax.model import decoder
from k15jax.model.config import ModelConfig

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
    spec: list[tuple[str, ...]] = []
    for name, dim in zip(names, shape):
        axes = LOGICAL_AXIS_RULES[name]
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in axes_t)
        spec.append(axes_t if size > 1 and dim % size == 0 else ())
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and not any("fsdp" in axes for axes in spec):
        size = lambda axes: math.prod(mesh.shape[a] for a in axes)
        fits = [d for d in range(len(shape)) if shape[d] % (size(spec[d]) * fsdp) == 0]
        if fits:
            d = max(fits, key=lambda d: shape[d] // size(spec[d]))
            spec[d] = (*spec[d], "fsdp")
    return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in spec))


def param_specs(cfg: ModelConfig, mesh: Mesh):
    """Returns the PartitionSpec tree of the model parameters on `mesh`."""
    shapes = decoder.abstract_params(cfg)
    return jax.tree.map(
        lambda names, s: logical_to_spec(names, s.shape, mesh),
        decoder.logical_axes(cfg),
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


def per_device_bytes(tree) -> int:
    """Returns the bytes of `tree`'s arrays that one device holds (the most loaded device)."""
    held: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values(), default=0)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params, cfg: ModelConfig, mesh: Mesh):
    """Returns `params` placed on `mesh` by the rules."""
    return distributed.put(params, param_shardings(cfg, mesh))
