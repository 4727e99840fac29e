"""Packing samples into trainer rows by length, so no step computes on padding.

A finished sample is a prompt plus its response, far shorter than the row length `seq_len`
that fits the longest one. Packing places several samples in one row, each its own segment
(the model restarts positions and masks attention at segment boundaries, `model.hidden_states`),
and the loss sums each sample's tokens by `sample_bt` (`losses.mirror_descent_loss`), so the
loss and its gradient are those of the unpacked batch.

The number of rows is rounded up to a bucket (`bucket`: a multiple of an eighth of the unpacked
row count) so that a run compiles the step for at most eight shapes. A step
may be packed in `parts` independent parts (the micro-batches of gradient accumulation): each part's
rows hold only its own samples, and its `sample_bt` indexes them from 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BUCKETS = 8  # row counts a step may have: cap/8, 2cap/8, ..., cap
MIN_BUCKET = 4  # ... but steps of a few rows differ by at least this many rows


def bucket(n: int, cap: int) -> int:
    """Returns n rounded up to a multiple of max(ceil(cap / BUCKETS), MIN_BUCKET), at most `cap`.

    Few on purpose: on CPU one compilation of the step costs two to three steps, so a finer grid
    would spend in compiling what it saves in padding; a coarser one pads too much (measured on
    the default run's SFT model: 128 samples fill 66 rows of 280 tokens, which a quarter grid
    pads to 96 rows and this one to 80). For small steps (cap < 32) the floor keeps the shapes
    fewer than eight: a row or two of padding costs less than a compilation.
    """
    size = max(-(-cap // BUCKETS), MIN_BUCKET)
    return min(-(-n // size) * size, cap)


def first_fit(lengths, capacity: int) -> list[list[int]]:
    """Returns rows of sample indices: first-fit by decreasing length into `capacity` tokens.

    Ties keep the input order, so the packing is deterministic.
    """
    lengths = np.asarray(lengths)
    if lengths.size and lengths.max() > capacity:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if n == 0:
            continue
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(int(i))
                free[r] -= n
                break
        else:
            rows.append([int(i)])
            free.append(capacity - n)
    return rows


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each sample of a step lies in the packed rows."""

    row_s: np.ndarray  # int row of each sample (-1: a sample without tokens)
    start_s: np.ndarray  # int first column of each sample in its row
    length_s: np.ndarray  # int tokens of each sample
    rows: int  # rows of the packed arrays (a multiple of `parts`)
    cols: int  # tokens per row
    parts: int


def layout(
    lengths, *, cols: int, parts: int = 1, multiple: int = 1, block: int | None = None
) -> Layout:
    """Returns the packing of samples of `lengths` tokens into rows of `cols` tokens.

    The samples are split into `parts` consecutive equal parts, each packed into the same
    bucketed number of rows (never more than its sample count, the unpacked size), rounded up
    to a multiple of `multiple` (the devices the rows are sharded over). With `block`, the row
    count is instead a multiple of `block`, for a function run on fixed blocks of rows.
    """
    lengths = np.asarray(lengths, np.int64)
    s = lengths.shape[0]
    if s % parts:
        raise ValueError(f"{s} samples do not split into parts={parts}")
    per = s // parts
    packed = [first_fit(lengths[p * per : (p + 1) * per], cols) for p in range(parts)]
    needed = max((len(r) for r in packed), default=1)
    if block is not None:
        rows_per_part = max(-(-needed // block), 1) * block
    else:
        rows_per_part = -(-bucket(needed, max(per, 1)) // multiple) * multiple
    row_s = np.full(s, -1, np.int64)
    start_s = np.zeros(s, np.int64)
    for p, part_rows in enumerate(packed):
        for r, members in enumerate(part_rows):
            col = 0
            for j in sorted(members):  # within a row, samples in their order
                row_s[p * per + j] = p * rows_per_part + r
                start_s[p * per + j] = col
                col += lengths[p * per + j]
    return Layout(row_s, start_s, lengths, rows_per_part * parts, cols, parts)


def pack(x_sl: np.ndarray, lay: Layout, *, fill=0) -> np.ndarray:
    """Returns per-sample rows `x_sl` [s, l] (each sample's tokens first) packed [rows, cols]."""
    out = np.full((lay.rows, lay.cols), fill, dtype=x_sl.dtype)
    for j in np.flatnonzero(lay.row_s >= 0):
        a, n = lay.start_s[j], lay.length_s[j]
        out[lay.row_s[j], a : a + n] = x_sl[j, :n]
    return out


def unpack(x_rc: np.ndarray, lay: Layout, cols: int) -> np.ndarray:
    """Returns packed rows `x_rc` as per-sample rows [s, cols], zero after each sample."""
    out = np.zeros((lay.row_s.shape[0], cols), x_rc.dtype)
    for j in np.flatnonzero(lay.row_s >= 0):
        a, n = lay.start_s[j], lay.length_s[j]
        out[j, :n] = x_rc[lay.row_s[j], a : a + n]
    return out


def segment_ids(lay: Layout) -> np.ndarray:
    """Returns int32 [rows, cols]: 1, 2, ... for the samples of each row in order, 0 on padding."""
    out = np.zeros((lay.rows, lay.cols), np.int32)
    for j in np.flatnonzero(lay.row_s >= 0):
        r, a, n = lay.row_s[j], lay.start_s[j], lay.length_s[j]
        out[r, a : a + n] = out[r, :a].max(initial=0) + 1
    return out


def sample_ids(lay: Layout) -> np.ndarray:
    """Returns int32 [rows, cols]: each token's sample, numbered from 0 within its part."""
    per = lay.row_s.shape[0] // lay.parts
    out = np.zeros((lay.rows, lay.cols), np.int32)
    for j in np.flatnonzero(lay.row_s >= 0):
        a, n = lay.start_s[j], lay.length_s[j]
        out[lay.row_s[j], a : a + n] = j % per
    return out
