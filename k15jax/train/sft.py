"""Long-CoT SFT warm-up (k1.5 §2.2 before RL): its settings, optimizer and batches.

Batches are drawn with replacement from the tokenized traces by a generator seeded with
(seed, step), so a resumed run draws the batches an uninterrupted one would. The examples of a
batch are packed into rows by length (`packing`): the loss is a mean over response tokens, so
packing changes what is computed on padding, not the loss or its gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import optax

from k15jax.train import packing, train_step

Example = tuple[list[int], list[int]]  # (prompt ids, response ids ending with eos)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftConfig:
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(
                f"need steps={self.steps} >= 0, batch_size={self.batch_size} >= 1, "
                f"checkpoint_every={self.checkpoint_every} >= 1"
            )


def tokenize(
    traces: Sequence[tuple[str, str]],
    encode: Callable[[str], list[int]],
    eos_id: int,
    *,
    encode_prompt: Callable[[str], list[int]] | None = None,
) -> list[Example]:
    """Returns (prompt ids, response ids + eos) of each (prompt, response) trace.

    `encode_prompt` (default `encode`) wraps a prompt as the rollouts see it: the run's prompt
    template and chat template (`run_setup.encode_prompt`).
    """
    encode_prompt = encode_prompt or encode
    return [(encode_prompt(prompt), encode(response) + [eos_id]) for prompt, response in traces]


# The SFT step: next-token cross-entropy on response tokens, each row its own group.
STEP_CONFIG = train_step.StepConfig(objective="sft", group_size=1)


def optimizer(cfg: SftConfig) -> optax.GradientTransformation:
    """Returns AdamW on a warm-up + cosine schedule (short runs keep a decay phase)."""
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), cfg.learning_rate * 0.1
    )
    return train_step.make_optimizer(schedule)


def batch(
    examples: Sequence[Example],
    *,
    step: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    pack: bool = True,
    multiple: int = 1,
) -> train_step.Batch:
    """Returns SFT batch `step`: prompt + response examples, loss on response tokens only.

    With `pack`, the examples are packed into rows of `seq_len` (a bucketed row count, a multiple
    of `multiple`: the devices the rows are sharded over; padding rows have valid 0); without, one
    example per row.
    """
    idx = np.random.default_rng([seed, 1, step]).integers(0, len(examples), batch_size)
    tokens = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), np.float32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    for row, k in enumerate(idx):
        p, r = examples[k]
        ids = (p + r)[:seq_len]
        tokens[row, : len(ids)], seg[row, : len(ids)] = ids, 1
        mask[row, len(p) : len(ids)] = 1
    if not pack:
        return train_step.Batch.for_sft(tokens, mask, seg)
    lay = packing.layout(seg.sum(axis=1), cols=seq_len, multiple=multiple)
    segments = packing.segment_ids(lay)
    valid = (segments > 0).any(axis=1).astype(np.float32)
    return train_step.Batch.for_sft(
        packing.pack(tokens, lay), packing.pack(mask, lay), segments, valid
    )
