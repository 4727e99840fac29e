"""Rollout engines: the `RolloutEngine` protocol, the real `VllmEngine`, and `FakeEngine`.

`VllmEngine` runs vLLM's offline `LLM` on a converted Hugging Face directory. Weights reach it
only through such directories: `load_weights` publishes params into shared memory (written to a
temporary directory, then renamed) and reloads vLLM in place, restarting it if that fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np

from k15jax.model import convert, decoder, generation
from k15jax.model.config import ModelConfig

log = logging.getLogger(__name__)
_FINISH = {"stop": "stop", "length": "length", "repetition": "repeat"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # vLLM's `log_level` names


@dataclasses.dataclass(frozen=True, kw_only=True)
class VllmConfig:
    """Engine knobs of vLLM (the names match `vllm.LLM` arguments where they exist)."""

    dtype: str = "float32"
    # Context of one sequence, prompt + response. None: vLLM's default, the model's own limit
    # (a run derives it instead: `run_config.engine_config`).
    max_model_len: int | None = 1024
    gpu_memory_utilization: float = 0.2  # used when kv_cache_memory_bytes is None
    # An explicit KV-cache size. On CPU vLLM otherwise sizes the cache as utilization x host
    # memory minus this process's resident memory, which fails once JAX shares the process.
    kv_cache_memory_bytes: int | None = 1 << 30
    enforce_eager: bool = True  # CPU start-up is ~30 s eager; compiled is slower to start
    seed: int = 0
    max_num_seqs: int = 256
    publish_dir: str = "/dev/shm/k15jax"  # where `load_weights` writes checkpoints
    # Run the engine core in this process (False) or a spawned one (True). In-process starts
    # faster on CPU and needs no `__main__` guard; a GPU deployment may prefer a separate process.
    multiprocessing: bool = False
    enable_prefix_caching: bool = True
    # Chunked prefill drops the token sampled for a partly prefilled prompt and rewinds its
    # seeded generator, which the CPU backend cannot do ("CPU Generator does not use offset"):
    # off by default so per-request seeds work on CPU.
    enable_chunked_prefill: bool = False
    # Colocated with the trainer (k1.5 §2.6): sleep while the trainer runs. 1: weights to host
    # memory, KV cache freed; 2: both freed (the next weights come from the published
    # directory anyway); 0: never sleep. vLLM has sleep mode on GPUs only: on CPU a sleep
    # pauses and resumes the scheduler and frees nothing.
    sleep_level: int = 0
    # vLLM's own log lines (engine start, weight loading, prefix-cache resets) below this level
    # are dropped, in this process and in launched servers; at INFO and below the weight-loading
    # progress bar shows too.
    log_level: str = "WARNING"

    def __post_init__(self):
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r} must be one of {LOG_LEVELS}")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level={self.sleep_level} must be 0, 1 or 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepeatSpec:
    """Stop a sample early when its last `p` tokens (min_pattern <= p <= max_pattern) repeat
    `min_count` times in a row (vLLM's scheduler checks it after every token)."""

    min_pattern: int = 2
    max_pattern: int = 64
    min_count: int = 4

    def __post_init__(self):
        if not 1 <= self.min_pattern <= self.max_pattern or self.min_count < 2:
            raise ValueError(
                f"need 1 <= min_pattern={self.min_pattern} <= max_pattern="
                f"{self.max_pattern} and min_count={self.min_count} >= 2"
            )


def repeat_end(token_ids: Sequence[int], spec: RepeatSpec) -> int | None:
    """Returns the length of the shortest prefix whose tail repeats as `spec` says, or None.

    The same rule as the engine's, for engines that check after the fact (FakeEngine).
    """
    for end in range(spec.min_pattern * spec.min_count, len(token_ids) + 1):
        for p in range(spec.min_pattern, spec.max_pattern + 1):
            if p * spec.min_count > end:
                break
            tail = token_ids[end - p : end]
            if all(
                token_ids[end - p * (m + 1) : end - p * m] == tail for m in range(1, spec.min_count)
            ):
                return end
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """How to sample: `n` samples per prompt, up to `max_tokens` new tokens each."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    repeat: RepeatSpec | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n={self.n} must be >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample: the generated ids, each one's sampling log-prob, and why it ended."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "repeat"


class RolloutEngine(Protocol):
    """What the RL loop needs from a generator of samples."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        spec: SamplingSpec,
        *,
        max_tokens: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Returns `spec.n` completions per prompt, grouped by prompt in prompt order.

        `max_tokens` and `seeds`, when given, override the spec per prompt.
        """

    def load_weights(self, params: decoder.Params) -> None:
        """Makes later `generate` calls sample from `params`."""

    def sleep(self) -> None:
        """Frees what the engine holds on the device until the next `load_weights` (the loop
        calls it while the trainer runs); a no-op for an engine that holds nothing."""

    def take_metrics(self) -> dict[str, float]:
        """Returns the engine's event counts since the last call (the loop records each as
        `engine/<name>`); {} for an engine with none."""


def _has_sleep_mode() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


def finish_reason(reason: str) -> str:
    """Returns the project's name ("stop" | "length" | "repeat") for vLLM's finish reason."""
    return _FINISH.get(reason, "length")


def check_params(cfg: ModelConfig, params: decoder.Params, model_dir: str) -> None:
    """Raises ValueError unless `params` has the shapes of the model `cfg` (from `model_dir`)."""
    want = jax.tree.map(lambda x: x.shape, decoder.abstract_params(cfg))
    got = jax.tree.map(lambda x: x.shape, params)
    if want != got:
        raise ValueError(
            f"params do not fit the engine's model ({model_dir}): expected shapes {want}, got {got}"
        )


@contextlib.contextmanager
def _environment(**values: str):
    """Sets environment variables for the block only, restoring the previous values after."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Two of vLLM's warnings are noise, dropped in this process only (a spawned engine core and
# launched servers still log them, the servers to their log files):
# - The in-place reload (`reload/layerwise.py`) counts every tensor of a module as loadable,
#   buffers included, and warns "<module>: Failed to load weights" on each reload for a module
#   of which the checkpoint held nothing. The rotary embedding is such a module: its one tensor,
#   `cos_sin_cache`, is a non-persistent buffer computed from the config (head size, rotary dim,
#   max positions, rope theta), in no checkpoint and unchanged by training. vLLM then puts the
#   engine's own cache back, which is right. The reload walks every module and has no way to
#   leave one out, and loading tensors without a checkpoint does not work on CPU
#   (ENVIRONMENT.md), so the warning is dropped instead.
# - The CPU worker binds its threads to cores and replaces `torch.set_num_threads` with a
#   function that warns and does nothing (`v1/worker/cpu_worker.py`); vLLM's own start-up
#   (`set_default_torch_num_threads`, entered and left once) then calls it, twice an engine.
#   The binding stays, which is what the worker wants.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"


class _KnownNoise(logging.Filter):
    """Drops the two vLLM warnings above: the rotary embedding's reload and the CPU worker's
    skipped `torch.set_num_threads`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights":
            return record.args != ("RotaryEmbedding",)
        return not str(record.msg).startswith("CPU backend doesn't allow to use `torch.set_num")


def set_log_level(level: str) -> None:
    """Sets vLLM's loggers in this process to `level` (one of `LOG_LEVELS`) and drops its two
    known-noise warnings (see `_KnownNoise`).

    The level holds for lines logged before vLLM configures its loggers; `vllm.LLM` then sets
    them again from its own `log_level` argument.
    """
    logging.getLogger("vllm").setLevel(level)
    for name in (_RELOAD_LOGGER, _CPU_WORKER_LOGGER):
        log = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in log.filters):
            log.addFilter(_KnownNoise())


def shows_progress(engine: VllmConfig) -> bool:
    """Returns whether vLLM shows its weight-loading progress bar: at log level INFO and below."""
    return logging.getLevelName(engine.log_level) <= logging.INFO


class VllmEngine:
    """A real vLLM engine started on a Hugging Face directory.

    Args:
      model_dir: converted directory (config.json, model.safetensors, tokenizer files).
      engine: vLLM knobs.
    """

    def __init__(self, model_dir: str, engine: VllmConfig = VllmConfig()):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        self.model_cfg = convert.read_config(model_dir)
        self.engine = engine
        self.model_dir = model_dir
        self._publish_count = 0
        self._restart_dir: str | None = None  # the directory the current engine was started on
        self.asleep = False
        self.llm = self._start(model_dir)

    def _start(self, model_dir: str):
        set_log_level(self.engine.log_level)
        import vllm

        t0 = time.perf_counter()
        # vLLM takes this choice only from the environment, and only while it starts: set it
        # for the start alone and leave the process environment as it was.
        multiprocessing = "1" if self.engine.multiprocessing else "0"
        with _environment(VLLM_ENABLE_V1_MULTIPROCESSING=multiprocessing):
            llm = self._construct(vllm, model_dir)
        log.info("vLLM started on %s in %.1fs", model_dir, time.perf_counter() - t0)
        return llm

    def _construct(self, vllm, model_dir: str):
        return vllm.LLM(
            model=model_dir,
            tokenizer=model_dir,
            dtype=self.engine.dtype,
            max_model_len=self.engine.max_model_len,
            gpu_memory_utilization=self.engine.gpu_memory_utilization,
            enforce_eager=self.engine.enforce_eager,
            seed=self.engine.seed,
            max_num_seqs=self.engine.max_num_seqs,
            enable_prefix_caching=self.engine.enable_prefix_caching,
            kv_cache_memory_bytes=self.engine.kv_cache_memory_bytes,
            enable_chunked_prefill=self.engine.enable_chunked_prefill,
            enable_sleep_mode=self.engine.sleep_level > 0 and _has_sleep_mode(),
            log_level=self.engine.log_level,
            use_tqdm_on_load=shows_progress(self.engine),
        )

    def sleep(self) -> None:
        """Frees the engine's device memory for the trainer (`VllmConfig.sleep_level`)."""
        if self.engine.sleep_level and not self.asleep:
            self.llm.sleep(level=self.engine.sleep_level)
            self.asleep = True

    def take_metrics(self) -> dict[str, float]:
        """An in-process engine counts no events."""
        return {}

    def wake(self) -> None:
        """Makes a sleeping engine ready to generate again."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None) -> list[Completion]:
        import vllm

        self.wake()

        def params(i):
            repeat = None
            if spec.repeat is not None:
                repeat = vllm.sampling_params.RepetitionDetectionParams(
                    max_pattern_size=spec.repeat.max_pattern,
                    min_pattern_size=spec.repeat.min_pattern,
                    min_count=spec.repeat.min_count,
                )
            return vllm.SamplingParams(
                n=spec.n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=spec.max_tokens if max_tokens is None else int(max_tokens[i]),
                seed=spec.seed if seeds is None else int(seeds[i]),
                logprobs=0,
                stop_token_ids=list(spec.stop_token_ids),
                detokenize=False,
                repetition_detection=repeat,
                ignore_eos=spec.ignore_eos,
            )

        inputs = [vllm.TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(inputs, [params(i) for i in range(len(inputs))], use_tqdm=False)
        result = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                ids = list(c.token_ids)
                logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
                reason = finish_reason(str(c.finish_reason))
                result.append(Completion(i, ids, logprobs, reason))
        return result

    def publish(self, params: decoder.Params) -> str:
        """Writes params as a Hugging Face directory under `publish_dir`; returns its path."""
        self._publish_count += 1
        path = os.path.join(self.engine.publish_dir, f"weights-{os.getpid()}")
        convert.save_hf(self.model_cfg, params, path)
        return path

    def load_weights(self, params: decoder.Params) -> None:
        """Publishes `params` and reloads vLLM in place; restarts the engine if that fails."""
        check_params(self.model_cfg, params, self.model_dir)
        path = self.publish(params)
        try:
            if self.asleep:  # weights memory back first, the KV cache after the reload
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self.wake()
            self.llm.reset_prefix_cache()
        except Exception as e:  # the engine's state is unknown after a failed reload
            log.warning("in-place weight reload failed (%s); restarting vLLM", e)
            self.restart(params)

    def restart(self, params: decoder.Params) -> None:
        """Shuts the engine down and starts a new one on `params` (the slow path)."""
        staged = tempfile.mkdtemp(prefix="k15jax-restart-", dir=self.engine.publish_dir)
        try:
            for name in os.listdir(self.model_dir):
                if name.startswith("tokenizer") or name == "special_tokens_map.json":
                    shutil.copy(os.path.join(self.model_dir, name), staged)
            convert.save_hf(self.model_cfg, params, os.path.join(staged, "model"))
            for name in os.listdir(staged):
                if name != "model":
                    shutil.move(os.path.join(staged, name), os.path.join(staged, "model", name))
            self.close()
            self.llm = self._start(os.path.join(staged, "model"))
        finally:
            self._restart_dir, old = staged, self._restart_dir
            if old:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        llm, self.llm, self.asleep = self.llm, None, False
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown:
                shutdown()
            del llm


@dataclasses.dataclass
class FakeEngine:
    """Samples with the plain JAX sampler: same interface, no vLLM; for fast unit tests."""

    cfg: ModelConfig
    params: decoder.Params
    eos_id: int
    seed: int = 0

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None) -> list[Completion]:
        import jax

        out = []
        for i, prompt in enumerate(prompts):
            seed = spec.seed if seeds is None else seeds[i]
            if seed is None:
                seed, self.seed = self.seed, self.seed + 1
            budget = spec.max_tokens if max_tokens is None else int(max_tokens[i])
            s = generation.generate(
                self.cfg,
                self.params,
                [list(prompt)] * spec.n,
                max_new_tokens=budget,
                eos_id=self.eos_id,
                temperature=spec.temperature,
                key=jax.random.key(seed),
            )
            for j in range(spec.n):
                ids = s.tokens[j, : s.lengths[j]].tolist()
                reason = "stop" if s.finished[j] else "length"
                if spec.repeat is not None and (end := repeat_end(ids, spec.repeat)) is not None:
                    ids, reason = ids[:end], "repeat"
                out.append(
                    Completion(i, ids, np.asarray(s.logprobs[j, : len(ids)]).tolist(), reason)
                )
        return out

    def load_weights(self, params: decoder.Params) -> None:
        self.params = params

    def sleep(self) -> None:
        """Nothing to free: the fake's arrays are the trainer's."""

    def take_metrics(self) -> dict[str, float]:
        return {}
