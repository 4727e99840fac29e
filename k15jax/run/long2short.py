"""Long2short (k1.5 §2.4): model merging, shortest rejection sampling, DPO and long2short RL.

Each method turns a long-CoT model into one that answers in fewer tokens:

- merge: the weighted mean of two checkpoints of one architecture (`merge_params`);
- shortest rejection sampling: n samples per prompt, the shortest correct one becomes an SFT
  example (`shortest_correct`, `sft_traces`), trained by the run's own SFT phase;
- DPO: the shortest correct response is chosen, the wrong ones longer than it and the correct
  ones at least `length_ratio` times longer are rejected (`preference_pairs`); `train_dpo` runs
  the "dpo" objective of `train_step` against the frozen starting model;
- long2short RL: the RL loop with a stronger length reward and a much smaller maximum rollout
  length (`rl_preset`).

Correctness is the run's `scoring.Scorer` (one definition everywhere); a sample cut at the
length limit or stopped for repetition is never correct.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k15jax.data import prompt_sets
from k15jax.infra import atomic
from k15jax.model import convert, decoder
from k15jax.model.config import ModelConfig
from k15jax.rewards import length as length_reward
from k15jax.rollout import engines
from k15jax.run import run_setup
from k15jax.run.run_config import ConfigError, RunConfig
from k15jax.train import train_step, update


class MergeError(ValueError):
    """Two checkpoints that cannot be averaged, naming the first differing tensor or field."""


@dataclasses.dataclass(frozen=True)
class Scored:
    """One sampled response to problem `prompt_index` and whether it is correct."""

    prompt_index: int
    token_ids: tuple[int, ...]
    correct: bool


@dataclasses.dataclass(frozen=True)
class Pair:
    """A DPO preference pair of one prompt: the chosen and the rejected response."""

    prompt_index: int
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


WRONG_RULES = ("longer", "all", "none")  # `PairRules.wrong`


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairRules:
    """Which responses of a prompt are rejected against its shortest correct one (chosen).

    `wrong`: which wrong responses are rejected. "longer" (the paper's "longer wrong
    responses", k1.5 §2.4): those with more tokens than the chosen; "all": every wrong one,
    a shorter one too (a pair that also teaches "longer is better"); "none": no wrong one.
    """

    wrong: str = "longer"
    length_ratio: float = 1.5  # correct responses at least this many times longer; 0: none

    def __post_init__(self):
        if self.wrong not in WRONG_RULES:
            raise ValueError(f"wrong={self.wrong!r} must be one of {WRONG_RULES}")
        if self.length_ratio != 0 and self.length_ratio < 1:
            raise ValueError(f"length_ratio={self.length_ratio} must be 0 (off) or >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpoConfig:
    """The DPO phase: optimizer steps, pairs drawn per step, AdamW learning rate and β."""

    steps: int = 60
    pairs_per_step: int = 16
    learning_rate: float = 1e-4
    beta: float = 0.1

    def __post_init__(self):
        if self.steps < 0 or self.pairs_per_step < 1 or self.beta <= 0:
            raise ValueError(
                f"need steps={self.steps} >= 0, pairs_per_step={self.pairs_per_step} >= 1, "
                f"beta={self.beta} > 0"
            )


# ------------------------------------------------------------------------------- merging


def _named_leaves(params) -> list[tuple[str, jax.Array]]:
    return [
        (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    ]


def check_mergeable(cfg_a: ModelConfig, params_a, cfg_b: ModelConfig, params_b) -> None:
    """Refuses two checkpoints that are not one architecture.

    Raises:
      MergeError: naming the first tensor whose name or shape differs, else the first
        differing config field.
    """
    a, b = _named_leaves(params_a), _named_leaves(params_b)
    for (name_a, x), (name_b, y) in zip(a, b, strict=False):
        if name_a != name_b:
            raise MergeError(
                f"first differing tensor: {name_a} in one checkpoint, {name_b} in the other"
            )
        if x.shape != y.shape:
            raise MergeError(
                f"first differing tensor: {name_a} has shape {list(x.shape)} and {list(y.shape)}"
            )
    if len(a) != len(b):
        extra = (a if len(a) > len(b) else b)[min(len(a), len(b))][0]
        raise MergeError(f"first differing tensor: {extra} is in one checkpoint only")
    fields_a, fields_b = dataclasses.asdict(cfg_a), dataclasses.asdict(cfg_b)
    for key in fields_a:
        if key not in ("dtype", "kernels") and fields_a[key] != fields_b[key]:
            raise MergeError(f"configs differ in {key}: {fields_a[key]!r} and {fields_b[key]!r}")


def merge_params(params_a, params_b, *, weight_a: float = 0.5):
    """Returns weight_a * params_a + (1 - weight_a) * params_b, in params_a's dtypes.

    The sum is taken in float32 (bfloat16 weights would round each term first).
    """
    if not 0 <= weight_a <= 1:
        raise ValueError(f"weight_a={weight_a} must be in [0, 1]")
    mix = lambda x, y: (
        weight_a * jnp.asarray(x, jnp.float32) + (1 - weight_a) * jnp.asarray(y, jnp.float32)
    ).astype(x.dtype)
    return jax.tree.map(mix, params_a, params_b)


def merge_checkpoints(dir_a: str, dir_b: str, out_dir: str, *, weight_a: float = 0.5) -> str:
    """Writes the merge of two Hugging Face directories to `out_dir` (with dir_a's tokenizer).

    Raises:
      MergeError: for checkpoints of different shapes or configs (`check_mergeable`).
    """
    from k15jax.model import tokenizer

    cfg_a, params_a = convert.load_hf(dir_a)
    cfg_b, params_b = convert.load_hf(dir_b)
    try:
        check_mergeable(cfg_a, params_a, cfg_b, params_b)
    except MergeError as e:
        raise MergeError(f"cannot merge {dir_a} and {dir_b}: {e}") from None
    merged = merge_params(params_a, params_b, weight_a=weight_a)
    return convert.save_hf(cfg_a, merged, out_dir, tokenizer=tokenizer.load(dir_a))


# ----------------------------------------------------------------------- sampling and picking


def sample(
    setup: run_setup.Setup,
    engine: engines.RolloutEngine,
    problems: Sequence[prompt_sets.Problem],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[Scored]]:
    """Returns `n` scored samples of each problem (the engine's current weights), per problem."""
    spec = engines.SamplingSpec(
        n=n, temperature=temperature, max_tokens=max_tokens, repeat=setup.cfg.repeat
    )
    prompts = [setup.prompt_ids(p) for p in problems]
    out = engine.generate(prompts, spec, seeds=[seed * 7919 + i for i in range(len(prompts))])
    groups: list[list[Scored]] = [[] for _ in problems]
    for c in out:
        _, ok, _ = setup.scorer(problems[c.prompt_index], c.token_ids, c.finish_reason)
        groups[c.prompt_index].append(Scored(c.prompt_index, tuple(c.token_ids), bool(ok)))
    return groups


def shortest_correct(groups: Sequence[Sequence[Scored]]) -> tuple[list[Scored], int]:
    """Returns (the shortest correct sample of each prompt that has one, prompts skipped).

    Ties go to the earliest sample, so the choice is deterministic.
    """
    chosen, skipped = [], 0
    for group in groups:
        correct = [s for s in group if s.correct]
        if not correct:
            skipped += 1
            continue
        chosen.append(min(correct, key=lambda s: len(s.token_ids)))
    return chosen, skipped


def preference_pairs(groups: Sequence[Sequence[Scored]], rules: PairRules) -> list[Pair]:
    """Returns the DPO pairs of every prompt: (shortest correct, each rejected response).

    Rejected (k1.5 §2.4): the wrong responses `rules.wrong` names (default: those longer than
    the chosen); with `rules.length_ratio` r > 0, every correct response of at least r times
    the chosen's tokens. A prompt without a correct response gives no pair.
    """
    pairs = []
    for group in groups:
        best, _ = shortest_correct([group])
        if not best:
            continue
        chosen = best[0]
        for s in group:
            if s is chosen:
                continue
            wrong = not s.correct and (
                rules.wrong == "all"
                or (rules.wrong == "longer" and len(s.token_ids) > len(chosen.token_ids))
            )
            longer = (
                rules.length_ratio > 0
                and s.correct
                and len(s.token_ids) >= rules.length_ratio * len(chosen.token_ids)
            )
            if wrong or longer:
                pairs.append(Pair(chosen.prompt_index, chosen.token_ids, s.token_ids))
    return pairs


def sft_traces(
    setup: run_setup.Setup, problems: Sequence[prompt_sets.Problem], chosen: Sequence[Scored]
) -> tuple[tuple[str, str], ...]:
    """Returns (prompt text in the run's template, response text) of each chosen sample.

    The end-of-sequence token is dropped from the text (the SFT phase appends its own).
    """
    eos = setup.tok.eos_id
    out = []
    for s in chosen:
        ids = [t for t in s.token_ids if t != eos]
        prompt = setup.cfg.task.prompt_template.format(prompt=problems[s.prompt_index].prompt)
        out.append((prompt, setup.tok.decode(ids)))
    return tuple(out)


def write_sft_jsonl(
    path: str,
    problems: Sequence[prompt_sets.Problem],
    chosen: Sequence[Scored],
    traces: Sequence[tuple[str, str]],
) -> str:
    """Writes the shortest-rejection SFT set as JSONL (id, prompt, answer, response, tokens)."""
    lines = [
        json.dumps(
            {
                "id": problems[s.prompt_index].id,
                "prompt": prompt,
                "answer": problems[s.prompt_index].answer,
                "response": response,
                "tokens": len(s.token_ids),
            }
        )
        for s, (prompt, response) in zip(chosen, traces, strict=True)
    ]
    return atomic.write_text(path, "".join(line + "\n" for line in lines))


def groups_to_json(groups: Sequence[Sequence[Scored]]) -> list:
    """Returns scored samples as JSON data (`groups_from_json` reads them back)."""
    return [[[s.prompt_index, list(s.token_ids), s.correct] for s in g] for g in groups]


def groups_from_json(obj: list) -> list[list[Scored]]:
    """Returns the scored samples `groups_to_json` wrote."""
    return [[Scored(int(i), tuple(ids), bool(ok)) for i, ids, ok in g] for g in obj]


# ------------------------------------------------------------------------------------- DPO


def pair_rows(
    pairs: Sequence[Pair], prompts: Sequence[Sequence[int]], *, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (tokens, loss mask, segment ids) [2 * pairs, seq_len]: row 2i chosen, 2i+1
    rejected, each prompt + response right-padded, the mask on response tokens only."""
    rows = 2 * len(pairs)
    tokens = np.zeros((rows, seq_len), np.int32)
    mask = np.zeros((rows, seq_len), np.float32)
    seg = np.zeros((rows, seq_len), np.int32)
    for i, pair in enumerate(pairs):
        p = list(prompts[pair.prompt_index])
        for row, response in ((2 * i, pair.chosen), (2 * i + 1, pair.rejected)):
            ids = (p + list(response))[:seq_len]
            tokens[row, : len(ids)], seg[row, : len(ids)] = ids, 1
            mask[row, len(p) : len(ids)] = 1
    return tokens, mask, seg


def train_dpo(
    setup: run_setup.Setup,
    params: decoder.Params,
    pairs: Sequence[Pair],
    cfg: DpoConfig,
    *,
    seed: int,
) -> tuple[decoder.Params, list[dict]]:
    """Returns (params, per-step metrics) after DPO from `params` against `params` frozen.

    Each step draws `cfg.pairs_per_step` pairs with replacement (seeded by (seed, step)); the
    reference log-probs of every pair are computed once, before the first step.
    """
    if not pairs or cfg.steps == 0:
        return params, []
    rows = 2 * cfg.pairs_per_step
    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(
            f"DPO step of {rows} rows (2 x pairs_per_step) does not split over the mesh's "
            f"data x fsdp = {shards} devices"
        )
    step_cfg = train_step.StepConfig(objective="dpo", group_size=2, beta=cfg.beta)
    optimizer = train_step.make_optimizer(cfg.learning_rate)
    trainer = train_step.make_trainer(setup.model_cfg, optimizer, step_cfg, setup.mesh)
    state = train_step.init_state(params, setup.model_cfg, optimizer, setup.mesh)
    prompts = [setup.prompt_ids(p) for p in setup.problems.train]
    tokens, mask, seg = pair_rows(pairs, prompts, seq_len=setup.cfg.seq_len)
    ref = train_step.reference_logprobs(trainer, state.params, tokens, seg, rows=rows)

    def batches():
        for i in range(cfg.steps):
            pick = np.random.default_rng([seed, 3, i]).integers(0, len(pairs), cfg.pairs_per_step)
            idx = np.stack([2 * pick, 2 * pick + 1], axis=1).reshape(-1)  # keep pairs adjacent
            yield train_step.Batch(
                tokens_bt=tokens[idx],
                mask_bt=mask[idx],
                ref_logp_bt=ref[idx],
                reward_b=np.zeros(rows, np.float32),
                segment_ids_bt=seg[idx],
                valid_b=np.ones(rows, np.float32),
            )

    history = []
    for i, (state, m) in enumerate(update.run_steps(trainer, state, batches(), where="DPO")):
        history.append({"step": i, **m})
    return jax.device_get(state.params), history


# ---------------------------------------------------------------------------- long2short RL


@dataclasses.dataclass(frozen=True, kw_only=True)
class RlPreset:
    """The long2short RL phase's changes to the RL flags (k1.5 §2.4; the paper gives neither
    number, spec §6: GAP). Against the run defaults (weight 0.1 after 15 warm-up iterations,
    192 response tokens): a 5x length-reward weight from the first iteration and a 3x shorter
    maximum rollout length."""

    length_weight: float = 0.5
    length_warmup: int = 0
    max_length: int = 64

    def __post_init__(self):
        if self.length_weight < 0 or self.length_warmup < 0 or self.max_length < 1:
            raise ValueError(
                f"need length_weight={self.length_weight} >= 0, length_warmup="
                f"{self.length_warmup} >= 0, max_length={self.max_length} >= 1"
            )


def rl_preset(cfg: RunConfig, preset: RlPreset = RlPreset()) -> RunConfig:
    """Returns `cfg` as a long2short RL run: `preset`'s length reward and maximum length (the
    per-iteration budget is capped to it, so no partial rollout outlives the limit)."""
    r = dataclasses.replace
    return r(
        cfg,
        length=length_reward.LengthPenaltyConfig(
            weight=preset.length_weight, warmup_iterations=preset.length_warmup
        ),
        partial=r(
            cfg.partial,
            max_length=preset.max_length,
            budget=min(cfg.partial.budget, preset.max_length),
        ),
    )


# ------------------------------------------------------------------------------- the report


def efficiency_rows(results: dict[str, dict]) -> list[dict]:
    """Returns one row per model of `evaluation.evaluate` results: pass@1, interval, tokens,
    and the change of mean tokens against the first model (the long one)."""
    base = next(iter(results.values()))["mean_length"]
    return [
        {
            "model": name,
            "pass_at_1": r["pass_at_1"],
            "ci95": r["ci95"],
            "mean_tokens": r["mean_length"],
            "length_change": r["mean_length"] / base - 1 if base else math.nan,
        }
        for name, r in results.items()
    ]


def markdown(rows: Sequence[dict], *, header: str) -> str:
    """Returns the token-efficiency table (one row per model) under `header`."""
    lines = [
        header,
        "",
        "| model | held-out pass@1 [95% interval] | mean response tokens | tokens vs long |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['model']} | {r['pass_at_1']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r['mean_tokens']:.1f} | {100 * r['length_change']:+.0f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str) -> str:
    """Writes the accuracy-against-tokens scatter (k1.5 Fig. 7) with interval bars as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        lo, hi = r["ci95"]
        y = r["pass_at_1"]
        ax.errorbar(r["mean_tokens"], y, yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
        ax.annotate(r["model"], (r["mean_tokens"], y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("mean response tokens (held-out)")
    ax.set_ylabel("held-out pass@1 (95% interval)")
    ax.set_title("long2short: accuracy against response length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}"  # renamed into place: never a half-written PNG
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
