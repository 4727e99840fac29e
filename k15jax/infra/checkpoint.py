"""Atomic orbax checkpoints of a TrainState plus plain-data run state.

Layout: `<dir>/step_<n>/` holds `state/` (orbax) and `extra.json` (JSON-serializable run state:
sampler, replay buffer, metric history). A checkpoint is built in a temporary directory and
renamed to `step_<n>` only when complete, so a crash mid-save leaves earlier ones loadable and
`latest_step` never sees a partial one.

On several processes (`distributed`) every process calls `save` and `restore` with the same
arguments: each writes and reads only the shards its devices hold (orbax), process 0 writes
`extra.json` and makes the checkpoint visible. The directory must be one file system that every
process sees (a shared mount or a bucket), as orbax requires.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp

from k15jax.infra import atomic, distributed

_STEP_RE = re.compile(r"^step_(\d+)$")


def steps(directory: str) -> list[int]:
    """Returns the completed checkpoint steps in `directory`, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(directory) if (m := _STEP_RE.match(name)))


def latest_step(directory: str) -> int | None:
    """Returns the newest completed checkpoint step, or None."""
    found = steps(directory)
    return found[-1] if found else None


def save(directory: str, step: int, state, extra: dict | None = None, *, keep: int = 2) -> str:
    """Writes `state` (any PyTree of arrays) and `extra` (JSON data) as checkpoint `step`.

    Keeps the newest `keep` checkpoints. Returns the checkpoint path.
    """
    directory = os.path.abspath(directory)
    final = os.path.join(directory, f"step_{step}")
    if distributed.multi():
        _save_multiprocess(final, state, extra)
    else:
        with atomic.directory(final) as tmp:
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(os.path.join(tmp, "state"), state)
            with open(os.path.join(tmp, "extra.json"), "w") as f:
                json.dump(extra or {}, f)
    if distributed.is_main():
        for old in steps(directory)[:-keep]:
            shutil.rmtree(os.path.join(directory, f"step_{old}"), ignore_errors=True)
    distributed.barrier(f"checkpoint {final} complete")
    return final


def _save_multiprocess(final: str, state, extra: dict | None) -> None:
    """`save` on several processes: one temporary directory named the same on every process,
    renamed into place by process 0 once every process's shards are written."""
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-multiprocess")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        os.makedirs(tmp)
    distributed.barrier(f"checkpoint {final} started")
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(tmp, "state"), state)
    distributed.barrier(f"checkpoint {final} written")
    if distributed.is_main():
        with open(os.path.join(tmp, "extra.json"), "w") as f:
            json.dump(extra or {}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)


def restore(directory: str, step: int, target) -> tuple[object, dict]:
    """Returns (state, extra) of checkpoint `step`; `target` gives structure, dtypes, shardings.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (with `.sharding` to place the result).
    """
    path = os.path.join(os.path.abspath(directory), f"step_{step}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (found steps {steps(directory)})")
    abstract = jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        ),
        target,
    )
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(path, "state"), abstract)
    with open(os.path.join(path, "extra.json")) as f:
        extra = json.load(f)
    return state, extra
