"""Partial rollouts (k1.5 §2.6.2): a per-iteration token budget, a replay buffer of unfinished
samples resumed next iteration, per-segment policy versions, and the trainer batch.

A group (the k samples of one drawn prompt) enters training only when all its samples have
ended, so its mean-reward baseline is exact. A sample ends when it stops (eos), repeats (stopped
by the engine) or reaches `max_length` response tokens ("truncated"). A sample cut by the budget
before that goes back into the buffer and is resumed as prompt + everything generated so far.

Which generated tokens enter the loss (`loss_segments`; the paper leaves it open):
  "all"        every segment, old ones evaluated against the current reference policy;
  "current"    only each sample's last segment(s): those generated in the last iteration it
               generated in (the current one, or the one it ended in while its group waited
               for other samples); earlier segments are context only;
  "drop_stale" only samples generated entirely in the current iteration (others get no loss).
All state here is plain data (`to_json` / `from_json`) for the run checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from k15jax.rollout.engines import RolloutEngine, SamplingSpec

LOSS_SEGMENTS = ("all", "current", "drop_stale")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialConfig:
    budget: int = 256  # new tokens per sample per iteration
    max_length: int = 1024  # response tokens at which an unfinished sample is truncated
    # "all": on the columns task (budget 96 of 192 tokens, seeds 0-2, BUILD.md "Partial
    # rollouts") it beat "current" on 2 of 3 seeds, +0.078 [-0.202, +0.358] over seeds:
    # inconclusive; "all" stays.
    loss_segments: str = "all"
    truncation_penalty: float = 0.5  # reward of a truncated sample: -penalty
    repeat_penalty: float = 0.5  # reward of a sample stopped for repetition: -penalty

    def __post_init__(self):
        if self.loss_segments not in LOSS_SEGMENTS:
            raise ValueError(f"loss_segments={self.loss_segments!r} must be one of {LOSS_SEGMENTS}")
        if not 0 < self.budget <= self.max_length:
            raise ValueError(f"need 0 < budget={self.budget} <= max_length={self.max_length}")


@dataclasses.dataclass
class Segment:
    iteration: int  # the policy version (iteration) that generated these tokens
    token_ids: list[int]
    logprobs: list[float]


@dataclasses.dataclass
class Sample:
    problem: int
    prompt_ids: list[int]
    segments: list[Segment] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # None while unfinished

    @property
    def response_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.token_ids]

    @property
    def length(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)


@dataclasses.dataclass
class Group:
    group_id: int
    samples: list[Sample]

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclasses.dataclass
class ReplayBuffer:
    groups: list[Group] = dataclasses.field(default_factory=list)
    next_group_id: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ReplayBuffer:
        groups = [
            Group(
                g["group_id"],
                [
                    Sample(
                        s["problem"],
                        s["prompt_ids"],
                        [Segment(**seg) for seg in s["segments"]],
                        s["finish_reason"],
                    )
                    for s in g["samples"]
                ],
            )
            for g in obj["groups"]
        ]
        return cls(groups=groups, next_group_id=obj["next_group_id"])


def rollout(
    engine: RolloutEngine,
    buffer: ReplayBuffer,
    new_problems: list[tuple[int, list[int]]],
    spec: SamplingSpec,
    cfg: PartialConfig,
    *,
    iteration: int,
    seed: int | None = None,
) -> tuple[list[Group], ReplayBuffer, dict]:
    """Runs one iteration's generation; returns (groups finished now, new buffer, stats).

    Args:
      engine: the rollout engine (already holding the current policy).
      buffer: groups left unfinished by earlier iterations.
      new_problems: (problem index, prompt ids) drawn this iteration; each gets `spec.n` samples.
      spec: sampling settings; `spec.max_tokens` is ignored in favour of the budget.
      cfg: budget, maximum length and penalties.
      iteration: the current policy version, recorded on every new segment.
      seed: if given, every request gets a seed derived from it (reproducible rollouts).
    """
    groups = [
        Group(g.group_id, [dataclasses.replace(s, segments=list(s.segments)) for s in g.samples])
        for g in buffer.groups
    ]
    next_id = buffer.next_group_id
    for problem, prompt_ids in new_problems:
        groups.append(Group(next_id, [Sample(problem, list(prompt_ids)) for _ in range(spec.n)]))
        next_id += 1
    todo = [s for g in groups for s in g.samples if s.finish_reason is None]
    prompts = [s.prompt_ids + s.response_ids for s in todo]
    budgets = [min(cfg.budget, cfg.max_length - s.length) for s in todo]
    seeds = None if seed is None else [seed * 1_000_003 + i for i in range(len(todo))]
    one = dataclasses.replace(spec, n=1)
    completions = engine.generate(prompts, one, max_tokens=budgets, seeds=seeds) if todo else []
    resumed = sum(1 for s in todo if s.segments)
    for sample, c in zip(todo, completions, strict=True):
        sample.segments.append(Segment(iteration, list(c.token_ids), list(c.logprobs)))
        if c.finish_reason in ("stop", "repeat"):
            sample.finish_reason = c.finish_reason
        elif sample.length >= cfg.max_length:
            sample.finish_reason = "truncated"
    finished = [g for g in groups if g.done]
    pending = [g for g in groups if not g.done]
    stats = {
        "requests": len(todo),
        "resumed": resumed,
        "new_tokens": sum(len(c.token_ids) for c in completions),
        "pending_samples": sum(s.finish_reason is None for g in pending for s in g.samples),
        "finished_groups": len(finished),
    }
    return finished, ReplayBuffer(pending, next_id), stats


def loss_mask(sample: Sample, iteration: int, loss_segments: str) -> list[float]:
    """Returns 1/0 per response token: does it enter the loss at `iteration` (module docstring).

    "current" keeps the sample's last iteration's segments, not `iteration`'s: a sample that
    ended an iteration before its group would otherwise have no loss token at all.
    """
    stale = any(seg.iteration != iteration for seg in sample.segments)
    last = sample.segments[-1].iteration if sample.segments else iteration
    out = []
    for seg in sample.segments:
        if loss_segments == "all":
            keep = True
        elif loss_segments == "current":
            keep = seg.iteration == last
        else:
            keep = not stale
        out.extend([float(keep)] * len(seg.token_ids))
    return out


def generated_at(sample: Sample, iteration: int) -> list[float]:
    """Returns 1/0 per response token: was it generated at `iteration`."""
    return [float(seg.iteration == iteration) for seg in sample.segments for _ in seg.token_ids]


@dataclasses.dataclass(frozen=True)
class PackedGroups:
    """Finished groups as padded arrays (rows grouped by `group_size` consecutive samples)."""

    tokens_bt: np.ndarray  # int32 prompt + response, right-padded with 0
    mask_bt: np.ndarray  # float32 1 on response tokens that enter the loss
    rollout_logp_bt: np.ndarray  # float32 the engine's sampling log-probs (0 elsewhere)
    segment_ids_bt: np.ndarray  # int32 1 on real tokens, 0 on padding
    response_mask_bt: np.ndarray  # float32 1 on every response token
    current_mask_bt: np.ndarray  # float32 1 on response tokens generated at `iteration`
    lengths_b: np.ndarray  # response lengths


def pack(groups: list[Group], *, iteration: int, loss_segments: str, pad_to: int) -> PackedGroups:
    """Returns the arrays of `groups`; every row is padded to `pad_to` tokens."""
    samples = [s for g in groups for s in g.samples]
    b = len(samples)
    tokens = np.zeros((b, pad_to), np.int32)
    mask = np.zeros((b, pad_to), np.float32)
    rlogp = np.zeros((b, pad_to), np.float32)
    seg = np.zeros((b, pad_to), np.int32)
    resp = np.zeros((b, pad_to), np.float32)
    current = np.zeros((b, pad_to), np.float32)
    for i, s in enumerate(samples):
        ids = s.prompt_ids + s.response_ids
        if len(ids) > pad_to:
            raise ValueError(f"sample of {len(ids)} tokens does not fit pad_to={pad_to}")
        p, n = len(s.prompt_ids), s.length
        tokens[i, : len(ids)] = ids
        seg[i, : len(ids)] = 1
        resp[i, p : p + n] = 1
        mask[i, p : p + n] = loss_mask(s, iteration, loss_segments)
        current[i, p : p + n] = generated_at(s, iteration)
        rlogp[i, p : p + n] = [lp for sg in s.segments for lp in sg.logprobs]
    lengths = np.array([s.length for s in samples])
    return PackedGroups(tokens, mask, rlogp, seg, resp, current, lengths)
