"""The k1.5 iteration update: π_θi of every sample, the optimizer reset, packed steps.

`rl_update` is the one path by which RL changes the policy: the run (`run.loop`), the
multi-host check and the tests call it. `run_steps` is the step loop every phase shares (SFT,
DPO, RL): one checked step per batch, a refused step raising `FloatingPointError`.

Samples arrive as `Samples`, host arrays with one row per sample (groups of `group_size`
consecutive rows); each optimizer step takes `rows_per_step` samples packed into rows by length
(`packing`), so only the packed row count changes the compiled shape.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator

import numpy as np

from k15jax.train import packing, train_step

STEP_METRICS = ("loss", "delta_mean", "delta_abs_mean", "zero_variance_groups", "grad_norm")


@dataclasses.dataclass(frozen=True)
class Samples:
    """One iteration's finished samples, one row each (the same on every process)."""

    tokens_bt: np.ndarray  # int32 prompt + response, right-padded with 0
    mask_bt: np.ndarray  # float32 1 on response tokens that enter the loss
    segment_ids_bt: np.ndarray  # int32 1 on real tokens, 0 on padding
    engine_logp_bt: np.ndarray  # float32 the engine's sampling log-probs (0 elsewhere)
    current_mask_bt: np.ndarray  # float32 1 on response tokens generated this iteration
    reward_b: np.ndarray  # float32 total reward per sample


def mean_step_metrics(steps: list[dict]) -> dict:
    """Returns the iteration's mean of each optimizer step's `STEP_METRICS`, and the step count."""
    out = {key: float(np.mean([m[key] for m in steps])) for key in STEP_METRICS}
    return dict(out, optimizer_steps=len(steps))


def run_steps(
    trainer: train_step.Trainer,
    state: train_step.TrainState,
    batches: Iterable[train_step.Batch],
    *,
    where: str,
    start: int = 0,
) -> Iterator[tuple[train_step.TrainState, dict[str, float]]]:
    """Yields (state, metrics) after one checked step per batch of `batches` (steps numbered
    from `start`); the metrics gain the step's wall time "seconds" and real "tokens".

    A refused (non-finite) step raises `FloatingPointError` naming `where` and the step.
    """
    for i, batch in enumerate(batches, start):
        t0 = time.perf_counter()
        state, m = train_step.checked_step(trainer, state, batch, where=f"{where} step {i}")
        tokens = float((np.asarray(batch.segment_ids_bt) > 0).sum())
        yield state, {**m, "seconds": time.perf_counter() - t0, "tokens": tokens}


def reference_block(rows_per_step: int, shards: int) -> int:
    """Returns the rows per call of the reference pass: a bucket of the step, whole shards."""
    size = packing.bucket(1, rows_per_step)
    return -(-size // shards) * shards


def reference(
    trainer: train_step.Trainer, params, samples: Samples, *, first: int, gap, max_gap, block
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (π_{θ_i} log-probs [b, t] for the update, 1/0 recomputed by the trainer [b]).

    Rows `:first` (the first step's samples) get the engine's log-probs where generated this
    iteration and NaN elsewhere: their reference is the step's own pass, the engine's values are
    only compared with it. Later samples whose loss tokens all come from this iteration get the
    engine's log-probs when `gap` (None: not measured yet) is at most `max_gap`; every other
    sample (older segments, or the engine not trusted) is recomputed by the trainer with
    `params` (θ_i), on packed rows, `block` rows at a time (one compiled shape).
    """
    n, seq_len = samples.tokens_bt.shape
    current = samples.current_mask_bt > 0
    current_only = ((samples.mask_bt > 0) <= current).all(axis=1)
    engine_ok = gap is not None and gap <= max_gap
    recompute = (np.arange(n) >= first) & ~(current_only & engine_ok)
    ref = np.where(current, samples.engine_logp_bt, 0.0).astype(np.float32)
    if recompute.any():
        idx = np.flatnonzero(recompute)
        lay = packing.layout(samples.segment_ids_bt[idx].sum(axis=1), cols=seq_len, block=block)
        logp = train_step.reference_logprobs(
            trainer,
            params,
            packing.pack(samples.tokens_bt[idx], lay),
            packing.segment_ids(lay),
            rows=block,
        )
        ref[idx] = packing.unpack(logp, lay, seq_len)
    ref[:first] = np.where(current[:first], samples.engine_logp_bt[:first], np.nan)
    return ref, recompute.astype(np.float32)


def packed_batch(
    samples: Samples, ref, idx, rows_per_step: int, micro: int, *, shards: int, self_ref: bool
) -> tuple[train_step.Batch, int]:
    """Returns (the Batch of samples `idx` packed by length, its row count); the samples are
    padded to `rows_per_step` (valid 0, no tokens) so that only the row count changes shape."""
    pad = rows_per_step - len(idx)
    take = lambda x: np.concatenate([x[idx], np.zeros((pad, *x.shape[1:]), x.dtype)])
    lengths = take(samples.segment_ids_bt.sum(axis=1))
    lay = packing.layout(lengths, cols=samples.tokens_bt.shape[1], parts=micro, multiple=shards)
    valid = take(np.ones(len(samples.tokens_bt), np.float32))
    batch = train_step.Batch(
        tokens_bt=packing.pack(take(samples.tokens_bt), lay),
        mask_bt=packing.pack(take(samples.mask_bt), lay),
        ref_logp_bt=packing.pack(take(ref), lay),
        reward_b=take(np.asarray(samples.reward_b, np.float32)),
        segment_ids_bt=packing.segment_ids(lay),
        valid_b=valid,
        sample_bt=packing.sample_ids(lay),
        self_ref_b=valid * float(self_ref),
    )
    return batch, lay.rows


def rl_update(
    trainer: train_step.Trainer,
    state: train_step.TrainState,
    samples: Samples,
    *,
    rows_per_step: int,
    micro_batches: int,
    shards: int,
    gap: float | None,
    max_gap: float,
    where: str,
) -> tuple[train_step.TrainState, dict[str, float]]:
    """One k1.5 iteration's update (the trainer's objective) on `samples`: (state, metrics).

    The optimizer state is reset first (k1.5 §2.3.2: every iteration starts a fresh
    optimizer). Each optimizer step takes `rows_per_step` samples. π_{θ_i} comes from three
    places, none computed twice (`reference`): the first step's own forward pass for its
    samples; the engine's sampling log-probs for later samples whose loss tokens were all
    generated this iteration, when the engine's last measured gap `gap` (mean |log-prob
    difference|) is at most `max_gap`; a trainer pass for the rest.
    `metrics["logprob_mismatch_mean"]` is this iteration's measurement, the next one's `gap`.
    """
    n = samples.tokens_bt.shape[0]
    lengths = samples.segment_ids_bt.sum(axis=1)
    steps = [np.arange(a, min(a + rows_per_step, n)) for a in range(0, n, rows_per_step)]
    t_ref = time.perf_counter()
    block = reference_block(rows_per_step, shards)
    ref, recompute = reference(
        trainer, state.params, samples, first=len(steps[0]), gap=gap, max_gap=max_gap, block=block
    )
    t0 = time.perf_counter()
    state = train_step.reset_optimizer(state, trainer.optimizer)
    batches, real_rows = [], 0
    for k, idx in enumerate(steps):
        batch, rows = packed_batch(
            samples, ref, idx, rows_per_step, micro_batches, shards=shards, self_ref=k == 0
        )
        batches.append(batch)
        real_rows += rows
    metrics = []
    for state, m in run_steps(trainer, state, batches, where=where):
        metrics.append(m)
    out = {
        "seconds_reference": t0 - t_ref,
        "seconds_update": time.perf_counter() - t0,
        **mean_step_metrics(metrics),
        "logprob_mismatch_mean": metrics[0]["engine_gap_mean"],
        "logprob_mismatch_max": metrics[0]["engine_gap_max"],
        "train_tokens_per_s": float(lengths.sum()) / (time.perf_counter() - t0),
        "reference_recomputed": float(recompute.mean()),
        "packed_rows": real_rows,
    }
    return state, out
