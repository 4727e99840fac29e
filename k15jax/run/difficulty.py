"""Difficulty estimation and prompt filters (k1.5 §2.1) through the `RolloutEngine` interface.

- pass rate: `n` samples per prompt at a high temperature, the fraction `scoring.Scorer` calls
  correct;
- drop prompts that are always solved (the paper's trivial-case prefilter);
- the easy-to-hack filter: a prompt is removed when the model, forced to answer without reasoning
  (the response starts with `answer_prefix`), is right within `tries` attempts (the paper: 8);
- `select_problems`: the run's RL pool after both, with its pass rates and what was removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from k15jax.data import prompt_sets
from k15jax.rewards import scoring
from k15jax.rollout.engines import RolloutEngine, SamplingSpec
from k15jax.run import run_setup


def pass_rates(
    engine: RolloutEngine,
    problems: Sequence[prompt_sets.Problem],
    scorer: scoring.Scorer,
    encode: Callable[[str], list[int]],
    *,
    n: int = 10,
    temperature: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    prefix: str = "",
    encode_raw: Callable[[str], list[int]] | None = None,
) -> np.ndarray:
    """Returns each problem's fraction of `n` sampled responses that are correct.

    `encode` turns a problem's text into prompt ids. `prefix` is a forced start of every
    response (the easy-to-hack filter's answer without reasoning): it ends every prompt and is
    prepended to every response before scoring. With `encode_raw` (an encoder without the
    prompt template) a prompt is `encode(text) + encode_raw(prefix)`, so the forced start
    follows the template; without it, `encode(text + prefix)` (a template-free `encode`).
    """
    if encode_raw is not None and prefix:
        tail = encode_raw(prefix)
        prompts = [encode(p.prompt) + tail for p in problems]
    else:
        prompts = [encode(p.prompt + prefix) for p in problems]
    spec = SamplingSpec(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    passed = np.zeros(len(problems))
    for c in engine.generate(prompts, spec):
        _, correct, _ = scorer(
            problems[c.prompt_index], c.token_ids, c.finish_reason, prefix=prefix
        )
        passed[c.prompt_index] += correct
    return passed / n


def easy_to_hack(
    engine: RolloutEngine,
    problems: Sequence[prompt_sets.Problem],
    scorer: scoring.Scorer,
    encode: Callable[[str], list[int]],
    *,
    answer_prefix: str,
    tries: int = 8,
    max_tokens: int = 16,
    seed: int = 0,
    encode_raw: Callable[[str], list[int]] | None = None,
) -> np.ndarray:
    """Returns a bool per problem: answered right within `tries` no-reasoning attempts.

    Each attempt is a response forced to start with `answer_prefix` right after the prompt
    (`pass_rates`' `prefix` and `encode_raw`), sampled at temperature 1.
    """
    rates = pass_rates(
        engine,
        problems,
        scorer,
        encode,
        n=tries,
        temperature=1.0,
        max_tokens=max_tokens,
        seed=seed,
        prefix=answer_prefix,
        encode_raw=encode_raw,
    )
    return rates > 0


def filter_problems(
    problems: Sequence[prompt_sets.Problem],
    rates: np.ndarray,
    *,
    hackable: np.ndarray | None = None,
    max_pass_rate: float = 1.0,
) -> tuple[list[prompt_sets.Problem], np.ndarray]:
    """Returns (kept problems, their pass rates): drops pass rate >= max_pass_rate (when 1.0:
    only the always-solved; inf: none) and, if given, the easy-to-hack ones."""
    keep = rates < max_pass_rate
    if hackable is not None:
        keep &= ~hackable
    idx = np.flatnonzero(keep)
    return [problems[i] for i in idx], rates[idx]


def select_problems(setup: run_setup.Setup, engine: RolloutEngine) -> dict:
    """Returns the RL pool the SFT model leaves (k1.5 §2.1): ids, pass rates and counts.

    Pass rates from `rl.difficulty_samples` samples at temperature 1; the easy-to-hack filter
    (`rl.easy_to_hack_tries` answers forced to start with `task.answer_prefix`, no reasoning;
    not for the code reward, whose answers are programs) and, with `rl.drop_solved`, the
    problems solved every time are removed. Runs on process 0.
    """
    cfg, pool = setup.cfg, setup.problems.train
    rates = pass_rates(
        engine,
        pool,
        setup.scorer,
        setup.encode_prompt,
        n=cfg.rl.difficulty_samples,
        temperature=1.0,
        max_tokens=cfg.partial.max_length,
        seed=cfg.seed,
    )
    hackable = np.zeros(len(pool), bool)
    if cfg.rl.easy_to_hack_tries and cfg.task.reward != "code":
        hackable = easy_to_hack(
            engine,
            pool,
            setup.scorer,
            setup.encode_prompt,
            answer_prefix=cfg.task.answer_prefix,
            tries=cfg.rl.easy_to_hack_tries,
            seed=cfg.seed + 2,
            encode_raw=setup.tok.encode,
        )
    max_rate = 1.0 if cfg.rl.drop_solved else np.inf
    kept, kept_rates = filter_problems(pool, rates, hackable=hackable, max_pass_rate=max_rate)
    return {
        "train_ids": [p.id for p in kept],
        "rates": kept_rates.tolist(),
        "pool": len(pool),
        "easy_to_hack": int(hackable.sum()),
        "easy_to_hack_tries": cfg.rl.easy_to_hack_tries,
        "solved": int(((rates >= max_rate) & ~hackable).sum()),
        "mean_pass_rate": float(rates.mean()),
    }


def pool_line(chosen: dict) -> str:
    """Returns the one-line log of `select_problems`' result."""
    tries = chosen["easy_to_hack_tries"]
    hack = f"easy-to-hack ({tries} tries) {chosen['easy_to_hack']}" if tries else "easy-to-hack off"
    return (
        f"difficulty: {len(chosen['train_ids'])} of {chosen['pool']} problems kept (removed: "
        f"{hack}, always solved {chosen['solved']}), mean SFT pass rate "
        f"{chosen['mean_pass_rate']:.3f}"
    )
