"""The state a run carries from step to step, saved and restored as one value per phase.

`SftState` and `RlState` hold the trainer state (arrays, orbax) and plain data (JSON); `save`
and `restore_latest` are the one checkpoint path of both phases. A checkpoint is written
atomically (`checkpoint.save`), so a run killed at any moment resumes from its last one.
"""

from __future__ import annotations

import dataclasses

from k15jax.data import sampler
from k15jax.infra import checkpoint
from k15jax.rollout import partial
from k15jax.train import train_step


@dataclasses.dataclass(frozen=True)
class SftState:
    train: train_step.TrainState
    history: tuple[dict, ...] = ()  # one entry per SFT step

    def to_json(self) -> dict:
        return {"history": list(self.history)}

    @classmethod
    def from_json(cls, train: train_step.TrainState, obj: dict) -> SftState:
        return cls(train, tuple(obj["history"]))


@dataclasses.dataclass(frozen=True)
class RlState:
    train: train_step.TrainState
    sampler: sampler.SamplerState
    buffer: partial.ReplayBuffer  # groups left unfinished by earlier iterations
    history: tuple[dict, ...]  # one entry per RL iteration
    train_ids: tuple[str, ...]  # the RL pool after the difficulty filter; sampler index order
    # mean |engine - trainer| log-prob of the last update's first step (None: not measured yet);
    # decides whether the next update may use the engine's log-probs as π_θi
    engine_gap: float | None = None

    def to_json(self) -> dict:
        return {
            "sampler": self.sampler.to_json(),
            "buffer": self.buffer.to_json(),
            "history": list(self.history),
            "train_ids": list(self.train_ids),
            "engine_gap": self.engine_gap,
        }

    @classmethod
    def from_json(cls, train: train_step.TrainState, obj: dict) -> RlState:
        history = tuple(obj["history"])
        if "engine_gap" in obj:
            gap = obj["engine_gap"]
        else:  # a checkpoint from before the field: the last update's measurement
            gap = next((m["logprob_mismatch_mean"] for m in history[::-1] if "loss" in m), None)
        return cls(
            train=train,
            sampler=sampler.SamplerState.from_json(obj["sampler"]),
            buffer=partial.ReplayBuffer.from_json(obj["buffer"]),
            history=history,
            train_ids=tuple(obj["train_ids"]),
            engine_gap=gap,
        )


def save(directory: str, step: int, state: SftState | RlState) -> str:
    """Writes `state` as checkpoint `step` of `directory`; returns its path."""
    return checkpoint.save(directory, step, state.train, state.to_json())


def restore_latest(
    directory: str, kind: type[SftState] | type[RlState], target: train_step.TrainState
) -> tuple[SftState | RlState, int] | None:
    """Returns (state, step) of the newest checkpoint in `directory`, or None if there is none.

    The trainer state is restored with `target`'s structure, dtypes and shardings.
    """
    step = checkpoint.latest_step(directory)
    if step is None:
        return None
    train, extra = checkpoint.restore(directory, step, target)
    return kind.from_json(train, extra), step
