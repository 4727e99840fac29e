"""Session-wide test set-up: 8 fake CPU devices for sharding tests, tiny Hugging Face models, and
one JAX compilation cache for the session and the runs it starts."""

import atexit
import dataclasses
import os
import shutil
import tempfile

# `make test` runs the suite in two workers (pytest-xdist, `-n 2 --dist loadfile`).
# Each worker is pinned to its own cores before any thread exists, and vLLM's OpenMP threads are
# bound to the same cores: two workers never spin on one core (vLLM's threads busy-wait).
# The launched servers and runs the tests start inherit both.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER is not None and 1 < _WORKERS <= len(os.sched_getaffinity(0)):
    _CORES = sorted(os.sched_getaffinity(0))[int(_WORKER[2:]) :: _WORKERS]
    os.sched_setaffinity(0, _CORES)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in _CORES)

# Must precede any JAX import (STYLE.md §4: set once, here).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Triton kernels run in Triton's interpreter on CPU. The flag must be set before triton is first
# imported (triton's own library functions are built for one mode), so it is set for the session.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Many tests compile the same programs again: each run builds its own jitted step (the RL loop's
# tests, a run and its resumed copy, the processes of a multi-process run). A persistent
# compilation cache, new for each session and removed after it, serves the repeats from disk
# (the same executable, so the same numbers). Subprocesses inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="k15jax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    # A size limit turns on JAX's file lock around reads and writes: the workers and the runs
    # they start use the cache at the same time (without it a read can see half a write).
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

# Test files that share a machine-wide resource never run at the same time in two workers: the
# sandbox's slot uids (61000 + slot; its tests also assert that no process of those uids is
# left). Each such file holds its group's lock while it runs (`make test` hands out whole files:
# `--dist loadfile`).
SERIAL_GROUPS = {
    "sandbox": (
        "test_sandbox.py",
        "test_sandbox_attacks.py",
        "test_testgen.py",
        "test_experiments.py",
    ),
}
_GROUP_OF = {name: group for group, names in SERIAL_GROUPS.items() for name in names}


@pytest.fixture(scope="module", autouse=True)
def _serial_group(request):
    """Holds the lock of the module's `SERIAL_GROUPS` entry (if any) while the module runs."""
    group = _GROUP_OF.get(request.path.name)
    if group is None:
        yield
        return
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), f"k15jax-tests-{group}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


HF_KWARGS = dict(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def build_hf_model(arch: str, path: str, *, tie: bool = False, seed: int = 0, std: float = 0.02):
    """Builds a randomly initialized tiny `transformers` model, saves it at `path`, returns it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if arch == "Qwen2ForCausalLM":
        config = transformers.Qwen2Config(**HF_KWARGS, tie_word_embeddings=tie, rope_theta=10000.0)
    elif arch == "Qwen3ForCausalLM":
        config = transformers.Qwen3Config(**HF_KWARGS, head_dim=32, tie_word_embeddings=tie)
    elif arch == "LlamaForCausalLM":
        config = transformers.LlamaConfig(**HF_KWARGS, tie_word_embeddings=tie, rope_theta=50000.0)
    else:
        raise ValueError(arch)
    config.initializer_range = std
    cls = getattr(transformers, arch)
    hf = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        # Norm weights start at one; perturb them so a swapped or missing norm shows in parity.
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny Qwen2, Qwen3 and tied-embedding Llama checkpoints, built once per session."""
    out = {}
    for arch, tie in (
        ("Qwen2ForCausalLM", False),
        ("Qwen3ForCausalLM", False),
        ("LlamaForCausalLM", True),
    ):
        path = str(tmp_path_factory.mktemp(arch))
        out[arch] = (path, build_hf_model(arch, path, tie=tie))
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A converted built-in-tokenizer Qwen2 with sharp logits (greedy has clear winners)."""
    import jax

    from k15jax.model import convert, decoder, tokenizer
    from k15jax.run import run_config

    # The shape of the RL loop's built-in model, so the loop test can reuse this engine.
    cfg = dataclasses.replace(
        run_config.RunConfig().model, vocab_size=tokenizer.builtin().vocab_size
    )
    params = decoder.init(cfg, jax.random.key(0))
    # Scale the matrices so logits have margins far above float32 noise across engines.
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, params)
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    convert.save_hf(cfg, params, path, tokenizer=tokenizer.builtin())
    return path, cfg, params


@pytest.fixture(scope="session")
def vllm_engine(tiny_hf_dir, tmp_path_factory):
    """One real vLLM engine for the whole session (start-up is paid once)."""
    from k15jax.rollout import engines

    publish = str(tmp_path_factory.mktemp("publish"))
    engine = engines.VllmEngine(
        tiny_hf_dir[0], engines.VllmConfig(max_model_len=512, publish_dir=publish)
    )
    yield engine
    engine.close()
