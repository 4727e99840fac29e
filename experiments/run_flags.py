"""The flags of the run scripts and their mapping to `RunConfig`, one section per config field.

`experiments.rl` is `main()` over this module; `sft`, `eval`, `long2short` and `task_study` take
the same flags by importing it. Each flag's default is the `RunConfig()` default (`D`), so a run
without flags is the built-in CPU demo, and `make_config()` with no flags given equals
`RunConfig()` (tested). Flag names and defaults are part of the saved `run_config.json` a resume
compares; change them only with that in mind.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NoReturn

from absl import app, flags, logging

from k15jax.data import prompt_sets, sampler, tasks
from k15jax.infra import distributed, logs
from k15jax.model import convert
from k15jax.model.config import DTYPES, KernelConfig
from k15jax.model.sharding import MESH_AXES
from k15jax.rewards import length as length_reward
from k15jax.rollout import partial, servers
from k15jax.run import run_config
from k15jax.train import preflight
from kernels import attention as kernel_attention
from kernels import logprobs as kernel_logprobs

D = run_config.RunConfig()
K = D.model.kernels


# --- The run and the model: RunConfig.out_dir, seed, model_dir, model, mesh ---

_OUT = flags.DEFINE_string("out_dir", D.out_dir, "Run directory (checkpoints, report).")
_SEED = flags.DEFINE_integer("seed", D.seed, "Seed of everything random in the run.")
_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (default: built-in).")
_LAYERS = flags.DEFINE_integer(
    "model_layers", D.model.num_hidden_layers, "Built-in model: decoder layers (no --model)."
)
_HIDDEN = flags.DEFINE_integer(
    "model_width", D.model.hidden_size, "Built-in model: width (no --model); MLP 3x, heads of 32."
)
_MESH = flags.DEFINE_string(
    "mesh",
    ",".join(f"{a}:{n}" for a, n in zip(MESH_AXES, D.mesh, strict=True)),
    "Trainer mesh sizes, e.g. data:2,fsdp:2,tensor:2 (one size may be -1: the rest).",
)
_DTYPE = flags.DEFINE_enum(
    "param_dtype", D.model.dtype, DTYPES, "Trainer parameter dtype (and vLLM's compute dtype)."
)

# --- Kernels: ModelConfig.kernels ---

_ATTN = flags.DEFINE_enum(
    "attention_impl", K.attention_impl, kernel_attention.IMPLS, "Attention implementation."
)
_LOGP = flags.DEFINE_enum(
    "logprob_impl", K.logprob_impl, kernel_logprobs.IMPLS, "Log-prob implementation."
)
_LOGP_CHUNK = flags.DEFINE_integer(
    "logprob_chunk", K.logprob_chunk, "Rows of logits per step of xla_chunked."
)
_BLOCK = flags.DEFINE_integer("attention_block", K.attention_block, "Tile of blockwise attention.")
_REMAT = flags.DEFINE_bool("remat", K.remat, "Recompute each layer in the backward pass.")

# --- The problems: TaskConfig ---

_DATA = flags.DEFINE_string("data", None, "JSONL prompt set (default: built-in task).")
_EVAL_DATA = flags.DEFINE_string("eval_data", None, "JSONL held-out set.")
_REWARD = flags.DEFINE_enum("reward", D.task.reward, prompt_sets.REWARDS, "Reward function.")
_ANSWER_FORMS = flags.DEFINE_bool(
    "answer_forms",
    D.task.answer_forms,
    "Built-in task: warm-up traces write the final answer in varied forms (twelve, 3*4, 12.0); "
    "grade with --reward=forms (exact) or a judge.",
)
_SFT_DATA = flags.DEFINE_string(
    "sft_data",
    None,
    "JSONL of long-CoT traces (prompt, response) for the SFT warm-up, with the --data rows "
    "that have a response.",
)
_TEMPLATE = flags.DEFINE_string("prompt_template", D.task.prompt_template, "Prompt format.")
_CHAT = flags.DEFINE_bool(
    "chat_template",
    D.task.chat_template,
    "Wrap prompts in the model's chat template (user turn) for SFT, rollouts and evaluation.",
)
_TRAIN_N = flags.DEFINE_integer(
    "train_problems", D.task.train_problems, "Built-in task: problems in the RL pool."
)
_SFT_N = flags.DEFINE_integer(
    "sft_examples", D.task.sft_examples, "Built-in task: long-CoT warm-up traces."
)
_SHORT = flags.DEFINE_float(
    "short_fraction",
    D.task.short_fraction,
    "Built-in task: fraction of warm-up traces that answer directly.",
)
_MAX_TERM = flags.DEFINE_integer(
    "max_term", D.task.max_term, "Built-in task: terms are 1..max_term."
)
_FAMILY = flags.DEFINE_enum("task_family", D.task.family, tasks.FAMILIES, "Built-in task family.")
_MIN_DIGITS = flags.DEFINE_integer(
    "min_digits", D.task.min_digits, "Built-in task 'columns': fewest digits (difficulty)."
)
_MAX_DIGITS = flags.DEFINE_integer(
    "max_digits", D.task.max_digits, "Built-in task 'columns': most digits (difficulty)."
)
_MIN_TERMS = flags.DEFINE_integer(
    "min_terms", D.task.min_terms, "Built-in task: fewest terms per problem (difficulty)."
)
_MAX_TERMS = flags.DEFINE_integer(
    "max_terms", D.task.max_terms, "Built-in task: most terms per problem (difficulty)."
)
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_tokens",
    D.task.max_prompt_tokens,
    "Longest prompt in tokens (sets the training length).",
)
_OVERLONG = flags.DEFINE_enum(
    "overlong_prompts",
    D.task.overlong_prompts,
    prompt_sets.OVERLONG,
    "A prompt over --max_prompt_tokens: drop it (counted in the report) or stop with an error.",
)
_SCREEN = flags.DEFINE_bool(
    "screen", D.task.screen, "JSONL RL pool: leave out multiple-choice, true/false and proofs."
)
_ANSWER_PREFIX = flags.DEFINE_string(
    "answer_prefix",
    D.task.answer_prefix,
    "Easy-to-hack check: the forced response start that asks for the answer directly.",
)

# --- Who grades RL samples: GraderConfig ---

_GRADER = flags.DEFINE_enum(
    "grader",
    D.grader.mode,
    run_config.GRADERS,
    "Who grades RL samples: the reward's rules, a judge model (--judge_model) for every sample, "
    "or the judge for what the rules score below 1. Evaluation always uses the rules.",
)
_JUDGE_MODEL = flags.DEFINE_string(
    "judge_model", None, "Judge model directory (experiments.judge writes one) for --grader."
)
_JUDGE_FALLBACK = flags.DEFINE_enum(
    "judge_fallback",
    D.grader.fallback,
    run_config.JUDGE_FALLBACKS,
    "Reward of a sample whose judge verdict is unusable: the rules', or 0.",
)

# --- The SFT warm-up: SftConfig ---

_SFT_BATCH = flags.DEFINE_integer("sft_batch_size", D.sft.batch_size, "SFT batch size.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", D.sft.steps, "Long-CoT SFT steps (0: skip).")
_SFT_LR = flags.DEFINE_float("sft_learning_rate", D.sft.learning_rate, "SFT peak LR.")

# --- The RL phase: RlConfig ---

_ITERS = flags.DEFINE_integer("iterations", D.rl.iterations, "RL iterations.")
_PROMPTS = flags.DEFINE_integer(
    "prompts_per_iteration", D.rl.prompts_per_iteration, "Prompts drawn per RL iteration."
)
_K = flags.DEFINE_integer("samples_per_prompt", D.rl.samples_per_prompt, "k samples per prompt.")
_TEMP = flags.DEFINE_float("temperature", D.rl.temperature, "Rollout temperature.")
_LR = flags.DEFINE_float("learning_rate", D.rl.learning_rate, "RL learning rate (AdamW).")
_TAU = flags.DEFINE_float("tau", D.rl.tau, "τ of the mirror-descent loss.")
_OBJECTIVE = flags.DEFINE_enum(
    "objective",
    D.rl.objective,
    run_config.RL_OBJECTIVES,
    "RL update: online policy mirror descent (k1.5), or rest: maximum likelihood on the samples "
    "with reward >= --rest_threshold only (ReST, k1.5 Fig. 10's baseline).",
)
_REST_T = flags.DEFINE_float(
    "rest_threshold", D.rl.rest_threshold, "--objective=rest: the total reward a sample needs."
)
_DIFF_N = flags.DEFINE_integer(
    "difficulty_samples",
    D.rl.difficulty_samples,
    "Samples per prompt for the SFT pass-rate estimate.",
)
_HACK_TRIES = flags.DEFINE_integer(
    "easy_to_hack_tries",
    D.rl.easy_to_hack_tries,
    "Drop problems the SFT model answers right within this many no-reasoning tries (0: off).",
)
_CKPT = flags.DEFINE_integer(
    "checkpoint_every", D.rl.checkpoint_every, "RL iterations between checkpoints."
)
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every",
    D.rl.eval_every,
    "RL iterations between held-out evaluations (0: only at the end).",
)
_GROUPS = flags.DEFINE_integer(
    "groups_per_step", D.rl.groups_per_step, "Prompts (groups of k) per optimizer step."
)
_ENGINE_REF = flags.DEFINE_float(
    "engine_reference_max_gap",
    D.rl.engine_reference_max_gap,
    "Take π_θi of this iteration's tokens from the engine's sampling log-probs while the "
    "measured mean |engine - trainer| log-prob gap is at most this (negative: always recompute).",
)
_MICRO = flags.DEFINE_integer(
    "micro_batches", D.rl.micro_batches, "Gradient-accumulation slices of each optimizer step."
)

# --- Partial rollouts, the length reward, the sampler ---
# PartialConfig, LengthPenaltyConfig, SamplerConfig

_BUDGET = flags.DEFINE_integer("budget", D.partial.budget, "Partial-rollout tokens/iteration.")
_MAXLEN = flags.DEFINE_integer("max_length", D.partial.max_length, "Maximum response tokens.")
_SEGMENTS = flags.DEFINE_enum(
    "loss_segments",
    D.partial.loss_segments,
    partial.LOSS_SEGMENTS,
    "Which partial-rollout segments enter the loss.",
)
_LEN_W = flags.DEFINE_float("length_weight", D.length.weight, "Length-reward weight.")
_LEN_WARM = flags.DEFINE_integer(
    "length_warmup", D.length.warmup_iterations, "Iterations without the length reward."
)
_CURRICULUM = flags.DEFINE_integer(
    "curriculum_iterations",
    D.sampler.curriculum_iterations,
    "Iterations of the curriculum warm-up (--curriculum_order), then the hard pool.",
)
_ORDER = flags.DEFINE_enum(
    "curriculum_order",
    D.sampler.order,
    list(sampler.ORDERS),
    "The warm-up's pool: easy_first (widens from the easiest problems, by the data set's "
    "difficulty labels, then the SFT pass rate) or uniform (all problems).",
)
_HARD = flags.DEFINE_float(
    "hard_threshold",
    D.sampler.hard_threshold,
    "After the curriculum switch: prompts with pass rate <= this.",
)
_FLOOR = flags.DEFINE_float(
    "priority_floor",
    D.sampler.epsilon,
    "Prioritized sampling draws ∝ max(1 - s_i, this); 0 (the paper): a problem always solved "
    "is not drawn.",
)

# --- The held-out evaluation: EvalConfig ---

_EVAL_N = flags.DEFINE_integer("eval_problems", D.eval.problems, "Held-out problems.")
_EVAL_K = flags.DEFINE_integer("eval_samples", D.eval.samples, "Samples per held-out problem.")
_EVAL_KS = flags.DEFINE_list(
    "eval_ks",
    [str(k) for k in D.eval.ks],
    "k of the held-out pass@k, avg@k and maj@k in the report (each <= --eval_samples; "
    "unset: those of the default that --eval_samples allows).",
)

# --- The rollout engine and servers: VllmConfig, ServerPoolConfig ---

_GPU_UTIL = flags.DEFINE_float(
    "gpu_memory_utilization",
    D.vllm.gpu_memory_utilization,
    "vLLM KV-cache fraction (GPU hosts, with --kv_cache_bytes=0).",
)
_CONTEXT = flags.DEFINE_integer(
    "max_model_len",
    D.vllm.max_model_len,
    "vLLM context per sequence (default: --max_prompt_tokens + --max_length).",
)
_KV = flags.DEFINE_integer(
    "kv_cache_bytes",
    D.vllm.kv_cache_memory_bytes,
    "vLLM KV-cache size in bytes (0: use --gpu_memory_utilization).",
)

_PUBLISH = flags.DEFINE_string(
    "publish_dir",
    D.vllm.publish_dir,
    "Where weights are published for the engine (every rollout server must read it).",
)
_SERVERS = flags.DEFINE_list(
    "rollout_servers",
    [],
    "host:port of running vLLM servers (VLLM_SERVER_DEV_MODE=1, --enable-scale-out) to roll "
    "out on instead of the in-process engine (deploy/README.md).",
)
_LAUNCH = flags.DEFINE_integer(
    "launch_servers", 0, "Start this many vLLM servers on loopback and roll out on them."
)
_SERVER_TIMEOUT = flags.DEFINE_float(
    "server_timeout_s",
    servers.ServerPoolConfig(launch=1).request_timeout_s,
    "A rollout request unanswered this long marks its server hung (it is sent elsewhere).",
)
_SLEEP = flags.DEFINE_enum(
    "engine_sleep_level",
    str(D.vllm.sleep_level),
    ["0", "1", "2"],
    "Colocated engine on the trainer's GPUs: sleep while the trainer runs (1: weights to host "
    "memory, 2: weights dropped; 0: never). JAX then takes device memory as needed, up to "
    "0.95 - --gpu_memory_utilization unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.",
)

# --- The memory pre-flight: PreflightConfig ---

_PREFLIGHT = flags.DEFINE_bool(
    "preflight", D.preflight.enabled, "Check before any rollout that the train step fits."
)
_DEVICE_GB = flags.DEFINE_float(
    "device_memory_gb",
    None,
    "Memory of one trainer device in GiB for the pre-flight (default: JAX's limit on a GPU; "
    "none known on CPU: the check is skipped).",
)
_ENGINE_FRACTION = flags.DEFINE_float(
    "engine_memory_fraction",
    D.preflight.engine_fraction,
    "Share of --device_memory_gb the colocated rollout engine takes (0: it has its own).",
)

# --- Multi-process runs: distributed.DistributedConfig ---

_COORD = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process run: host:port of process 0's coordinator (or JAX_COORDINATOR_ADDRESS).",
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-process run: number of processes.")
_PROC_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index.")
_DIST_AUTO = flags.DEFINE_bool(
    "distributed", False, "Multi-process run found by JAX's cluster detection (Kubernetes, TPU)."
)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """Returns (data, fsdp, tensor) sizes from "data:2,fsdp:2,tensor:2" (absent axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, size = part.partition(":")
        if name.strip() not in sizes or not size.strip().lstrip("-").isdigit():
            raise app.UsageError(
                f"--mesh={text}: {part!r} is not AXIS:SIZE with AXIS one of {MESH_AXES}"
            )
        sizes[name.strip()] = int(size)
    return tuple(sizes[a] for a in MESH_AXES)


def parse_ks(values) -> tuple[int, ...]:
    """Returns the sorted distinct k of ["1", "4"]; refuses anything but positive integers."""
    if not values or not all(v.strip().isdigit() and int(v) > 0 for v in values):
        raise ValueError(f"--eval_ks={','.join(values)}: expected positive integers like 1,4")
    return tuple(sorted({int(v) for v in values}))


def eval_ks() -> tuple[int, ...]:
    """Returns --eval_ks; left unset, the default's k that --eval_samples allows."""
    if flags.FLAGS["eval_ks"].present:
        return parse_ks(_EVAL_KS.value)
    return tuple(k for k in D.eval.ks if k <= _EVAL_K.value) or (1,)


def make_config() -> run_config.RunConfig:
    """Returns the RunConfig the flags describe (defaults: the built-in CPU demo)."""
    r = dataclasses.replace
    return r(
        D,
        out_dir=_OUT.value,
        seed=_SEED.value,
        model_dir=_MODEL.value,
        model=model_config(),
        mesh=parse_mesh(_MESH.value),
        task=task_config(),
        sft=r(
            D.sft, steps=_SFT_STEPS.value, learning_rate=_SFT_LR.value, batch_size=_SFT_BATCH.value
        ),
        rl=rl_config(),
        eval=r(D.eval, problems=_EVAL_N.value, samples=_EVAL_K.value, ks=eval_ks()),
        partial=r(
            D.partial, budget=_BUDGET.value, max_length=_MAXLEN.value, loss_segments=_SEGMENTS.value
        ),
        length=length_reward.LengthPenaltyConfig(
            weight=_LEN_W.value, warmup_iterations=_LEN_WARM.value
        ),
        sampler=sampler.SamplerConfig(
            curriculum_iterations=_CURRICULUM.value,
            order=_ORDER.value,
            hard_threshold=_HARD.value,
            epsilon=_FLOOR.value,
        ),
        preflight=preflight.PreflightConfig(
            enabled=_PREFLIGHT.value,
            device_memory_gb=_DEVICE_GB.value,
            engine_fraction=_ENGINE_FRACTION.value,
        ),
        vllm=engine_config(),
        servers=server_pool_config(),
        grader=run_config.GraderConfig(
            mode=_GRADER.value, judge_model=_JUDGE_MODEL.value, fallback=_JUDGE_FALLBACK.value
        ),
    )


def model_config():
    """Returns the built-in model's shape from --model_layers and --model_width (the MLP stays 3x
    the width, heads stay 32 wide, half as many KV heads), with the dtype and kernels."""
    width = _HIDDEN.value
    return dataclasses.replace(
        D.model,
        num_hidden_layers=_LAYERS.value,
        hidden_size=width,
        intermediate_size=D.model.intermediate_size * width // D.model.hidden_size,
        num_attention_heads=width // D.model.head_dim,
        num_key_value_heads=max(1, width // D.model.head_dim // 2),
        dtype=_DTYPE.value,
        kernels=KernelConfig(
            attention_impl=_ATTN.value,
            attention_block=_BLOCK.value,
            logprob_impl=_LOGP.value,
            logprob_chunk=_LOGP_CHUNK.value,
            remat=_REMAT.value,
        ),
    )


def task_config() -> prompt_sets.TaskConfig:
    """Returns the problems: a JSONL set (--data) or the built-in task's family and difficulty."""
    return dataclasses.replace(
        D.task,
        data=_DATA.value,
        eval_data=_EVAL_DATA.value,
        sft_data=_SFT_DATA.value,
        chat_template=_CHAT.value,
        reward=_REWARD.value,
        prompt_template=_TEMPLATE.value,
        max_prompt_tokens=_MAX_PROMPT.value,
        overlong_prompts=_OVERLONG.value,
        screen=_SCREEN.value,
        answer_prefix=_ANSWER_PREFIX.value,
        train_problems=_TRAIN_N.value,
        sft_examples=_SFT_N.value,
        short_fraction=_SHORT.value,
        family=_FAMILY.value,
        min_terms=_MIN_TERMS.value,
        min_digits=_MIN_DIGITS.value,
        max_digits=_MAX_DIGITS.value,
        max_terms=_MAX_TERMS.value,
        max_term=_MAX_TERM.value,
        answer_forms=_ANSWER_FORMS.value,
    )


def rl_config() -> run_config.RlConfig:
    """Returns the RL phase's settings."""
    return dataclasses.replace(
        D.rl,
        iterations=_ITERS.value,
        prompts_per_iteration=_PROMPTS.value,
        samples_per_prompt=_K.value,
        temperature=_TEMP.value,
        learning_rate=_LR.value,
        tau=_TAU.value,
        objective=_OBJECTIVE.value,
        rest_threshold=_REST_T.value,
        groups_per_step=_GROUPS.value,
        micro_batches=_MICRO.value,
        engine_reference_max_gap=_ENGINE_REF.value,
        difficulty_samples=_DIFF_N.value,
        easy_to_hack_tries=_HACK_TRIES.value,
        checkpoint_every=_CKPT.value,
        eval_every=_EVAL_EVERY.value,
    )


def sleep_level() -> int:
    """Returns --engine_sleep_level: the in-process engine's and every rollout server's."""
    return int(_SLEEP.value)


def engine_config():
    """Returns the in-process engine's knobs; it computes in the trainer's dtype (--param_dtype)."""
    return dataclasses.replace(
        D.vllm,
        dtype=_DTYPE.value,
        max_model_len=_CONTEXT.value,
        gpu_memory_utilization=_GPU_UTIL.value,
        kv_cache_memory_bytes=_KV.value or None,
        publish_dir=_PUBLISH.value,
        sleep_level=sleep_level(),
        log_level=logs.library_level(verbosity()),
    )


def server_pool_config() -> servers.ServerPoolConfig | None:
    """Returns the rollout servers the flags name, or None for the in-process engine."""
    if not _SERVERS.value and not _LAUNCH.value:
        return None
    return servers.ServerPoolConfig(
        addresses=tuple(_SERVERS.value),
        launch=_LAUNCH.value,
        request_timeout_s=_SERVER_TIMEOUT.value,
        sleep_level=sleep_level(),
    )


def colocated_memory() -> None:
    """Sets JAX's device-memory environment for an engine sharing the trainer's GPUs: no
    preallocation, and a cap that leaves vLLM its share (only what the user has not set)."""
    if sleep_level():
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        share = max(0.05, 0.95 - _GPU_UTIL.value)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{share:.2f}")


def verbosity() -> int:
    """Returns absl's --verbosity (-v); unset, -1 (warnings) rather than the INFO absl turns on."""
    return logging.get_verbosity() if flags.FLAGS["verbosity"].present else logging.WARNING


def config_from_argv(argv) -> run_config.RunConfig:
    """Returns `make_config()` after refusing positional arguments and setting the log levels:
    the run's own at --verbosity, vLLM's and JAX's one step quieter (rl, sft and eval share it)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(verbosity())
    logs.set_library_levels(logs.library_level(verbosity()))
    return make_config()


def distributed_config() -> distributed.DistributedConfig:
    """Returns how this process joins a multi-process run (flags; else JAX's environment)."""
    return distributed.DistributedConfig(
        coordinator_address=_COORD.value,
        num_processes=_NPROC.value,
        process_id=_PROC_ID.value,
        auto=_DIST_AUTO.value,
    )


# Mistakes in flags, files or the run directory: reported in one line, without a traceback
# (any other exception is a bug and keeps its traceback). ValueErrors of the dataclasses'
# checks are caught only while the flags become a config.
USER_ERRORS = (
    prompt_sets.DataError,
    run_config.ConfigError,
    convert.CheckpointError,
    FileNotFoundError,
    preflight.DoesNotFit,
)


def fail(error: Exception) -> NoReturn:
    """Prints `error` as one line on stderr and exits with status 2 (a usage error)."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
