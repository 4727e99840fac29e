"""Prompt sampler: curriculum (a warm-up phase, then the hard pool) x prioritized sampling.

k1.5 §2.3.4: training starts on easy problems and moves to hard ones, using the data set's own
difficulty labels; problem i is drawn with probability ∝ 1 - s_i, s_i its success rate during
RL. The paper's curriculum ablation (Fig. 9) samples uniformly from everything first and then
switches to hard problems only. Two warm-up orders, `SamplerConfig.order`:
  - "easy_first": at warm-up iteration t < T (`curriculum_iterations`) the pool is the easiest
    ceil(n (t + 1) / T) problems in the easy-first order (`easy_first_order`: by the data set's
    difficulty label when problems carry one, then by the SFT pass rate, highest first), so it
    widens from the easiest problems to all of them;
  - "uniform": the pool is every problem (the ablation's warm-up).
After the warm-up the pool is the hard problems (estimated pass rate <= `hard_threshold`; 1.0:
all of them).
GAP choices made here: s_i starts at the estimated pass rate and is a running mean of the
observed rewards; priority weighting applies inside the current pool, warm-up included; draws
are independent (with replacement) so frequencies follow the weights exactly. A problem the model
always solved (s_i = 1) is not drawn, as the paper writes; `SamplerConfig.epsilon` > 0 floors
the weight at max(1 - s_i, ε) to keep it drawable (no measurement says this helps). When every
problem of the pool has weight 0 (all solved, no floor), the pool is drawn uniformly.

The state is plain data (`to_json`/`from_json`) that a checkpoint stores; the same state gives
the same draws.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ORDERS = ("easy_first", "uniform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    curriculum_iterations: int = 0  # the warm-up phase's length in iterations
    order: str = "easy_first"  # the warm-up's pool (`ORDERS`, module docstring)
    hard_threshold: float = 1.0  # the pool after it: pass rate <= this (1.0: everything)
    epsilon: float = 0.0  # floor of the priority 1 - s_i (0: none, the paper)
    prioritized: bool = True

    def __post_init__(self):
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if self.curriculum_iterations < 0:
            raise ValueError(f"curriculum_iterations={self.curriculum_iterations} must be >= 0")
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r} must be one of {ORDERS}")


@dataclasses.dataclass
class SamplerState:
    pass_rate: list[float]  # estimated before RL (difficulty), fixed
    success: list[float]  # s_i, running mean of rewards seen in RL (starts at pass_rate)
    count: list[int]  # observations behind each s_i (the estimate counts as one)
    rng: dict  # numpy PCG64 state
    # Each problem's place in the easy-first order (0: easiest); None (a state saved before
    # the order existed): by pass rate alone.
    rank: list[int] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> SamplerState:
        return cls(**obj)


def easy_first_order(pass_rates, labels=None) -> np.ndarray:
    """Returns the problem indices easiest first.

    By the data set's difficulty label (`labels`, higher is harder; a problem without a label
    when others have one counts as the mean label), then by the SFT pass rate (higher first),
    then by index.
    """
    rates = np.asarray(pass_rates, np.float64)
    known = [float(x) for x in labels or () if x is not None]
    if known:
        fill = float(np.mean(known))
        level = np.array([fill if x is None else float(x) for x in labels], np.float64)
    else:
        level = np.zeros_like(rates)
    return np.lexsort((np.arange(rates.size), -rates, level))


def init_state(pass_rates, *, seed: int, labels=None) -> SamplerState:
    """Returns the sampler state for problems with estimated `pass_rates` (in [0, 1]) and, if
    the data set has them, difficulty `labels` (None entries: unlabelled)."""
    rates = [float(r) for r in pass_rates]
    if not rates:
        raise ValueError("the sampler needs at least one problem")
    if any(not 0 <= r <= 1 for r in rates):
        raise ValueError("pass rates must be in [0, 1]")
    if labels is not None and len(labels) != len(rates):
        raise ValueError(f"{len(labels)} difficulty labels for {len(rates)} problems")
    rank = np.empty(len(rates), np.int64)
    rank[easy_first_order(rates, labels)] = np.arange(len(rates))
    return SamplerState(
        pass_rate=rates,
        success=list(rates),
        count=[1] * len(rates),
        rng=np.random.Generator(np.random.PCG64(seed)).bit_generator.state,
        rank=rank.tolist(),
    )


def pool(state: SamplerState, cfg: SamplerConfig, iteration: int) -> np.ndarray:
    """Returns the indices drawable at `iteration` (module docstring)."""
    n = len(state.pass_rate)
    everything = np.arange(n)
    if iteration < cfg.curriculum_iterations:
        if cfg.order == "uniform":
            return everything
        rank = (
            np.asarray(state.rank)
            if state.rank is not None
            else np.argsort(easy_first_order(state.pass_rate))
        )
        size = -(-n * (iteration + 1) // cfg.curriculum_iterations)
        return everything[rank < size]
    hard = everything[np.asarray(state.pass_rate) <= cfg.hard_threshold]
    return hard if hard.size else everything


def probabilities(state: SamplerState, cfg: SamplerConfig, iteration: int) -> np.ndarray:
    """Returns P(i) over all problems at `iteration` (0 outside the pool): ∝ max(1 - s_i, ε)
    inside it, uniform over it when every such weight is 0."""
    idx = pool(state, cfg, iteration)
    weights = np.zeros(len(state.pass_rate))
    weights[idx] = 1.0
    if cfg.prioritized:
        priority = np.maximum(1.0 - np.asarray(state.success)[idx], cfg.epsilon)
        if priority.sum() > 0:
            weights[idx] = priority
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
