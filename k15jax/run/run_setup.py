"""Everything a run reads, built once from its `RunConfig`: model, tokenizer, problems, scorer.

`prepare(cfg)` returns the frozen `Setup` every phase of `loop` takes; nothing changes it.
Beside it, what is decided from the setup alone before training: the checks that refuse a run
(`check_problems`, `check_memory`), the lines and counts of the problems left out
(`removed_lines`, `removed_counts`), and the judge grader's engine (`make_grader`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from k15jax.data import prompt_sets, screen
from k15jax.infra import distributed
from k15jax.model import convert, decoder, sharding, tokenizer
from k15jax.model.config import ModelConfig
from k15jax.rewards import judge as judge_lib
from k15jax.rewards import sandbox as sandbox_lib
from k15jax.rewards import scoring
from k15jax.rollout import engines, servers
from k15jax.run import evaluation
from k15jax.run.run_config import ConfigError, RunConfig, engine_config
from k15jax.train import preflight, sft

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every phase reads; built once by `prepare`, never changed."""

    cfg: RunConfig
    model_cfg: ModelConfig  # the trainer's model: shape, dtype, kernels
    params: decoder.Params  # the starting weights, placed on `mesh`
    tok: tokenizer.Tokenizer
    problems: prompt_sets.ProblemSet
    scorer: scoring.Scorer
    mesh: Mesh
    removed: prompt_sets.Removed  # problems left out before training (screen, over-long prompts)

    def encode_prompt(self, text: str) -> list[int]:
        """Returns the token ids of a problem text in the run's prompt template."""
        return encode_prompt(self.tok, self.cfg.task, text)

    def prompt_ids(self, problem: prompt_sets.Problem) -> list[int]:
        """Returns `problem`'s prompt ids; refuses one over `task.max_prompt_tokens`."""
        return prompt_sets.prompt_ids(
            problem, encode=self.encode_prompt, max_tokens=self.cfg.task.max_prompt_tokens
        )


def encode_prompt(tok: tokenizer.Tokenizer, task: prompt_sets.TaskConfig, text: str) -> list[int]:
    """Returns the token ids of a problem text in `task`'s prompt template (and, with
    `task.chat_template`, the model's chat template around it)."""
    text = task.prompt_template.format(prompt=text)
    if task.chat_template:
        text = tok.apply_chat_template(text)
    return tok.encode(text)


def prepare(cfg: RunConfig, *, sandbox: sandbox_lib.Sandbox | None = None) -> Setup:
    """Loads or builds the model, tokenizer, problems and scorer of the run.

    The flags, the prompt files and the model's limits are checked before any weights are
    loaded or built, so a mistake stops the run within seconds.
    """
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"--mesh: {e}") from None
    check_batches(cfg, sharding.batch_shards(mesh))
    if cfg.model_dir is not None:
        if not os.path.isdir(cfg.model_dir):
            raise FileNotFoundError(f"--model={cfg.model_dir}: no such directory")
        positions = convert.read_config(cfg.model_dir).max_position_embeddings
        tok = tokenizer.load(cfg.model_dir)
    else:
        positions = cfg.model.max_position_embeddings
        tok = tokenizer.builtin()
    if cfg.task.chat_template and tok.chat_template is None:
        where = cfg.model_dir or "the built-in tokenizer"
        raise ConfigError(
            f"--chat_template: {where} has no chat template (chat_template.jinja, or "
            "chat_template in tokenizer_config.json)"
        )
    check_judge(cfg)
    context = engine_config(cfg).max_model_len
    if context > positions:
        raise ConfigError(
            f"the engine's context of {context} tokens (max_model_len, else max_prompt_tokens + "
            f"max_length) exceeds the model's max_position_embeddings={positions}"
        )
    problems, removed = load_problems(
        cfg, functools.partial(encode_prompt, tok, cfg.task), response_tokens=tok.encode
    )
    if cfg.model_dir is not None:
        shape, params = convert.load_hf(cfg.model_dir, dtype=cfg.model.dtype)
        model_cfg = dataclasses.replace(shape, kernels=cfg.model.kernels)
        params = sharding.shard_params(params, model_cfg, mesh)  # host arrays to their shards
    else:
        model_cfg = dataclasses.replace(
            cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
        )
        # Built where it lives: each device computes only its shards of the initial weights.
        init = functools.partial(decoder.init, model_cfg)
        shardings = sharding.param_shardings(model_cfg, mesh)
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(cfg.seed))
    scorer = scoring.Scorer(
        reward_fn=scoring.reward_fn(cfg.task.reward, sandbox=sandbox),
        decode=tok.decode,
        truncation_penalty=cfg.partial.truncation_penalty,
        repeat_penalty=cfg.partial.repeat_penalty,
    )
    return Setup(cfg, model_cfg, params, tok, problems, scorer, mesh, removed)


def with_judge_fingerprint(cfg: RunConfig) -> RunConfig:
    """Returns `cfg` with its judge directory's fingerprint (`judge.fingerprint`) recorded, on
    process 0 (which alone grades); a fingerprint already in `cfg` must match the directory."""
    g = cfg.grader
    if g.judge_model is None or not distributed.is_main():
        return cfg
    check_judge(cfg)
    found = judge_lib.fingerprint(g.judge_model)
    if g.judge_fingerprint not in (None, found):
        raise ConfigError(
            f"--judge_model={g.judge_model}: fingerprint {found[:12]}, but the config asks for "
            f"{g.judge_fingerprint[:12]} (another judge's weights or judge config)"
        )
    return dataclasses.replace(cfg, grader=dataclasses.replace(g, judge_fingerprint=found))


def check_judge(cfg: RunConfig) -> None:
    """Refuses a judge model directory that is missing, has a bad judge_config.json, or whose
    context cannot hold its prompt bound plus its token bound."""
    path = cfg.grader.judge_model
    if path is None or not distributed.is_main():  # process 0 alone grades
        return
    if not os.path.isdir(path):
        raise ConfigError(f"--judge_model={path}: no such directory")
    try:
        jcfg = judge_lib.load_config(path)
    except ValueError as e:
        raise ConfigError(f"--judge_model: {e}") from None
    positions = convert.read_config(path).max_position_embeddings
    if jcfg.max_prompt_tokens + jcfg.max_tokens > positions:
        raise ConfigError(
            f"--judge_model={path}: its judge config asks for {jcfg.max_prompt_tokens} prompt + "
            f"{jcfg.max_tokens} judge tokens, over the model's max_position_embeddings="
            f"{positions} (lower max_prompt_tokens in {judge_lib.CONFIG_FILE})"
        )


def load_problems(
    cfg: RunConfig,
    encode: Callable[[str], list[int]],
    *,
    response_tokens: Callable[[str], list[int]] | None = None,
) -> tuple[prompt_sets.ProblemSet, prompt_sets.Removed]:
    """Returns the run's problems without those it leaves out, and what it left out.

    A JSONL RL pool is screened (`screen.screen`, unless `task.screen` is off); prompts over
    `task.max_prompt_tokens` in the RL pool and the held-out set are dropped or refused
    (`task.overlong_prompts`). `encode` applies the prompt template. SFT traces (the pool's
    `response` rows and `task.sft_data`) are left out when their prompt is a held-out problem's,
    and, with `response_tokens` (the response's encoder), when prompt + response + eos does not
    fit a trainer row (dropped, or refused like an over-long prompt).
    """
    task = cfg.task
    problems = prompt_sets.load_problems(task, held_out_problems=cfg.eval.problems, seed=cfg.seed)
    # Traces from files are checked against a row; the built-in task's are cut to one, as ever.
    builtin = () if task.data is not None else problems.sft_traces
    from_files = problems.sft_traces if task.data is not None else ()
    if task.sft_data is not None:
        from_files = (*from_files, *prompt_sets.load_traces(task.sft_data))
    train, screened = problems.train, {}
    if task.data is not None and task.screen:
        train, screened = screen.screen(train)
    fit = functools.partial(
        prompt_sets.drop_overlong,
        encode=encode,
        max_tokens=task.max_prompt_tokens,
        overlong=task.overlong_prompts,
    )
    train, overlong_train = fit(train, what=f"RL pool ({task.data or 'built-in task'})")
    held_out, overlong_held_out = fit(
        problems.held_out, what=f"held-out set ({task.eval_data or task.data or 'built-in task'})"
    )
    held_prompts = {p.prompt.strip() for p in held_out}
    leak = lambda ts: tuple(t for t in ts if t[0].strip() not in held_prompts)  # noqa: E731
    kept_builtin, kept_files = leak(builtin), leak(from_files)
    sft_held_out = len(builtin) + len(from_files) - len(kept_builtin) - len(kept_files)
    fits = []
    for prompt, response in kept_files:
        n = len(encode(prompt)) + len(response_tokens(response)) + 1 if response_tokens else 0
        if n <= cfg.seq_len:  # + 1: eos
            fits.append((prompt, response))
        elif task.overlong_prompts == "error":
            raise prompt_sets.DataError(
                f"SFT trace {prompt[:40]!r}: {n} tokens exceed a trainer row of {cfg.seq_len} "
                "(--max_prompt_tokens + --max_length; raise them, or --overlong_prompts=drop "
                "to leave such traces out)"
            )
    sft_overlong, kept = len(kept_files) - len(fits), (*kept_builtin, *fits)
    removed = prompt_sets.Removed(
        screened, overlong_train, overlong_held_out, sft_held_out=sft_held_out,
        sft_overlong=sft_overlong,
    )  # fmt: skip
    problems = dataclasses.replace(problems, train=train, held_out=held_out, sft_traces=kept)
    return problems, removed


def check_batches(cfg: RunConfig, shards: int) -> None:
    """Refuses batch sizes that the mesh's `shards` (data x fsdp devices) do not divide."""
    micro = cfg.rl.rows_per_step // cfg.rl.micro_batches
    for name, rows in (("RL micro-batch", micro), ("SFT batch", cfg.sft.batch_size)):
        if rows % shards:
            raise ConfigError(
                f"{name} of {rows} rows does not split over the mesh's data x fsdp = {shards} "
                "devices (RL: groups_per_step x samples_per_prompt / micro_batches; SFT: "
                "sft_batch_size); change them or --mesh"
            )


def evaluate(setup: Setup, engine: engines.RolloutEngine) -> dict:
    """Returns held-out pass@1, its 95% interval and mean length (`evaluation.evaluate`)."""
    held_out = setup.problems.held_out
    return evaluation.evaluate(
        engine,
        held_out,
        [setup.prompt_ids(p) for p in held_out],
        setup.scorer,
        setup.cfg.eval,
        max_tokens=setup.cfg.partial.max_length,
        repeat=setup.cfg.repeat,
        seed=setup.cfg.seed + 1,
    )


def check_problems(setup: Setup) -> None:
    """Refuses a run whose RL pool or held-out set is empty after the prompt filters."""
    task = setup.cfg.task
    for what, problems in (
        ("RL pool", setup.problems.train),
        ("held-out set", setup.problems.held_out),
    ):
        if not problems:
            raise prompt_sets.DataError(
                f"{what} of {task.data or 'the built-in task'}: no problem left after the screen "
                f"and --max_prompt_tokens={task.max_prompt_tokens}"
            )


def removed_lines(setup: Setup) -> list[str]:
    """Returns the console lines of the problems left out before training."""
    removed, task = setup.removed, setup.cfg.task
    lines = []
    if removed.screened:
        total = len(setup.problems.train) + sum(len(i) for i in removed.screened.values())
        total += len(removed.overlong_train)
        lines.append(screen.screen_line(removed.screened, total))
    if removed.sft_held_out or removed.sft_overlong:
        lines.append(
            f"SFT traces left out: {removed.sft_held_out} whose prompt is held out, "
            f"{removed.sft_overlong} longer than a trainer row of {setup.cfg.seq_len} tokens"
        )
    if removed.overlong_train or removed.overlong_held_out:
        lines.append(
            f"prompts over --max_prompt_tokens={task.max_prompt_tokens} dropped: "
            f"{len(removed.overlong_train)} of the RL pool, {len(removed.overlong_held_out)} "
            f"held-out (first: {(removed.overlong_train or removed.overlong_held_out)[0]})"
        )
    return lines


def removed_counts(setup: Setup) -> dict:
    """Returns the numbers of problems left out, for the report (process 0, after RL)."""
    counts = setup.removed.counts()
    path = os.path.join(setup.cfg.out_dir, "difficulty.json")
    if os.path.exists(path):  # absent when RL was resumed from an older run's checkpoint
        with open(path) as f:
            chosen = json.load(f)
        counts.update(
            {key: chosen[key] for key in ("pool", "easy_to_hack", "easy_to_hack_tries", "solved")}
        )
    return counts


def check_memory(setup: Setup, console) -> None:
    """The memory pre-flight (`preflight`): compiles the SFT and RL steps for the run's shapes
    and refuses the run before any rollout if one will not fit; skipped where no limit is known."""
    cfg, rl = setup.cfg, setup.cfg.rl
    if not cfg.preflight.enabled:
        return
    limit, how = preflight.available_bytes(cfg.preflight)
    if limit is None:
        log.info("memory pre-flight skipped: %s", how)
        return
    plan = lambda opt, step_cfg, rows, what: preflight.plan_step(
        setup.model_cfg, opt, step_cfg, setup.mesh, rows=rows, seq_len=cfg.seq_len, what=what
    )
    rows = rl.rows_per_step
    plans = [
        plan(rl.optimizer(), rl.step_config(), rows, f"RL step ({rows} x {cfg.seq_len} tokens)")
    ]
    if cfg.sft.steps and setup.problems.sft_traces:
        n = cfg.sft.batch_size
        plans.append(
            plan(sft.optimizer(cfg.sft), sft.STEP_CONFIG, n, f"SFT step ({n} x {cfg.seq_len})")
        )
    console(preflight.check(cfg.preflight, plans, setup.model_cfg, setup.mesh, rl.micro_batches))


JUDGE_SERVER_DIR = "judge_server"  # under the run directory: the judge server's record


def make_grader(setup: Setup, stack: contextlib.ExitStack) -> scoring.Grader | None:
    """Returns the run's judge grader, or None when the rules grade alone.

    The judge is served by a vLLM server of its own (`servers.ServerPool` with one launched
    server, recorded under `<out_dir>/judge_server`, stopped by `stack` and by its watchdog if
    the trainer dies), never by a second engine in this process: closing an in-process vLLM
    engine tears down vLLM's process-wide parallel groups, which would break the rollout engine.
    """
    g = setup.cfg.grader
    if g.mode == "rules":
        return None
    jcfg = judge_lib.load_config(g.judge_model)
    vcfg = dataclasses.replace(
        setup.cfg.vllm,
        max_model_len=jcfg.max_prompt_tokens + jcfg.max_tokens,
        kv_cache_memory_bytes=g.kv_cache_memory_bytes,
        sleep_level=0,
    )
    record = os.path.join(setup.cfg.out_dir, JUDGE_SERVER_DIR)
    os.makedirs(record, exist_ok=True)
    pool = servers.ServerPoolConfig(launch=1, log_dir=record)
    engine = servers.ServerPool(g.judge_model, vcfg, pool, run_dir=record)
    stack.callback(engine.close)
    fallback = setup.scorer.reward_fn if g.fallback == "rules" else judge_lib.zero
    judge = judge_lib.Judge(engine, tokenizer.load(g.judge_model), fallback=fallback, config=jcfg)
    log_path = os.path.join(setup.cfg.out_dir, "judge_log.jsonl")
    return scoring.Grader(judge=judge, mode=g.mode, log_path=log_path)
