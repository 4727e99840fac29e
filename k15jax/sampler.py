"""Prompt sampler: curriculum (all prompts, then the hard pool) x prioritized sampling.

k1.5 §2.3.4: draw problem i with probability ∝ 1 - s_i, s_i its success rate during RL; the
curriculum ablation samples uniformly from everything first and switches to hard problems only.
GAP choices made here: s_i starts at the estimated pass rate and is a running mean of the
observed rewards; a floor ε keeps solved problems drawable; "hard" means an estimated pass rate
at or below `hard_threshold`; priority weighting applies inside the current curriculum pool;
draws are independent (with replacement) so frequencies follow the weights exactly.

The state is plain data (`to_json`/`from_json`) that a checkpoint stores; the same state gives
the same draws.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    curriculum_iterations: int = 0  # uniform over all prompts for this many iterations
    hard_threshold: float = 1.0  # the hard pool: pass rate <= this (1.0: no curriculum)
    epsilon: float = 0.05  # floor of the priority 1 - s_i
    prioritized: bool = True

    def __post_init__(self):
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in (0, 1]")
        if self.curriculum_iterations < 0:
            raise ValueError(f"curriculum_iterations={self.curriculum_iterations} must be >= 0")


@dataclasses.dataclass
class SamplerState:
    pass_rate: list[float]  # estimated before RL (difficulty), fixed
    success: list[float]  # s_i, running mean of rewards seen in RL (starts at pass_rate)
    count: list[int]  # observations behind each s_i (the estimate counts as one)
    rng: dict  # numpy PCG64 state

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> SamplerState:
        return cls(**obj)


def init_state(pass_rates, *, seed: int) -> SamplerState:
    """Returns the sampler state for problems with estimated `pass_rates` (in [0, 1])."""
    rates = [float(r) for r in pass_rates]
    if not rates:
        raise ValueError("the sampler needs at least one problem")
    if any(not 0 <= r <= 1 for r in rates):
        raise ValueError("pass rates must be in [0, 1]")
    return SamplerState(
        pass_rate=rates,
        success=list(rates),
        count=[1] * len(rates),
        rng=np.random.Generator(np.random.PCG64(seed)).bit_generator.state,
    )


def pool(state: SamplerState, cfg: SamplerConfig, iteration: int) -> np.ndarray:
    """Returns the indices drawable at `iteration` (everything during the curriculum warm-up)."""
    everything = np.arange(len(state.pass_rate))
    if iteration < cfg.curriculum_iterations:
        return everything
    hard = everything[np.asarray(state.pass_rate) <= cfg.hard_threshold]
    return hard if hard.size else everything


def probabilities(state: SamplerState, cfg: SamplerConfig, iteration: int) -> np.ndarray:
    """Returns P(i) over all problems at `iteration` (0 outside the pool)."""
    idx = pool(state, cfg, iteration)
    weights = np.zeros(len(state.pass_rate))
    if cfg.prioritized:
        weights[idx] = np.maximum(1.0 - np.asarray(state.success)[idx], cfg.epsilon)
    else:
        weights[idx] = 1.0
    return weights / weights.sum()


def draw(
    state: SamplerState, cfg: SamplerConfig, iteration: int, n: int
) -> tuple[np.ndarray, SamplerState]:
    """Returns (n problem indices, the state after drawing them)."""
    gen = np.random.Generator(np.random.PCG64())
    gen.bit_generator.state = state.rng
    chosen = gen.choice(
        len(state.pass_rate), size=n, replace=True, p=probabilities(state, cfg, iteration)
    )
    return chosen, dataclasses.replace(state, rng=gen.bit_generator.state)


def update(state: SamplerState, indices, rewards) -> SamplerState:
    """Returns the state with each problem's running success rate updated by its rewards."""
    success, count = list(state.success), list(state.count)
    for i, r in zip(indices, rewards, strict=True):
        i = int(i)
        count[i] += 1
        success[i] += (float(r) - success[i]) / count[i]
    return dataclasses.replace(state, success=success, count=count)
