"""Every experiment script builds its configuration from default flags, and flags reach it."""

import dataclasses

from absl import flags

from experiments import bench, convert, eval, rl, sft  # noqa: F401 - define their flags
from k15jax import run_config
from k15jax.config import KernelConfig


def _parse(*args):
    f = flags.FLAGS
    f.unparse_flags()
    f(["prog", *args])


def test_default_flags_give_the_default_config():
    _parse()
    assert rl.make_config() == run_config.RunConfig()


def test_flags_reach_the_config():
    _parse(
        "--tau=0.05",
        "--samples_per_prompt=16",
        "--budget=100",
        "--max_length=200",
        "--length_weight=0.3",
        "--curriculum_iterations=4",
        "--kv_cache_bytes=0",
        "--data=x.jsonl",
        "--reward=math",
        "--attention_impl=xla_chunked",
        "--logprob_impl=xla_chunked",
        "--remat",
        "--mesh=data:2,tensor:-1",
        "--micro_batches=4",
        "--param_dtype=bfloat16",
    )
    cfg = rl.make_config()
    assert cfg.model.kernels == KernelConfig(
        attention_impl="xla_chunked", logprob_impl="xla_chunked", remat=True
    )
    assert cfg.mesh == (2, 1, -1) and cfg.rl.micro_batches == 4
    assert cfg.model.dtype == cfg.vllm.dtype == "bfloat16"
    assert cfg.rl.tau == 0.05 and cfg.rl.samples_per_prompt == 16
    assert (cfg.partial.budget, cfg.partial.max_length) == (100, 200)
    assert cfg.length.weight == 0.3 and cfg.sampler.curriculum_iterations == 4
    assert cfg.vllm.kv_cache_memory_bytes is None
    assert dataclasses.replace(cfg.task, data=None, reward="task") == run_config.RunConfig().task
    _parse()


def _run_script(module: str, *args, tmp_path) -> str:
    """Runs `python -m module args` (scripts whose flag names overlap bench's run alone)."""
    import pathlib
    import subprocess
    import sys

    out = tmp_path / f"{module}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", f"--out={out}", *args],
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parents[1],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists()
    return proc.stdout


def test_kernel_bench_speed_path_runs_on_cpu(tmp_path):
    text = _run_script(
        "kernel_bench", "--impls=xla_chunked,triton", "--speed_lengths=128",
        "--heads=2", "--tokens_per_batch=128", "--logprob_impls=", "--repeats=1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "| xla_chunked | 128 |" in text
    assert "| triton | - |" in text and "jax-triton" in text  # recorded, not fatal, on CPU


def test_bad_mesh_flag_is_refused():
    import pytest
    from absl import app

    with pytest.raises(app.UsageError, match="'pipe:2' is not AXIS:SIZE"):
        rl.parse_mesh("data:2,pipe:2")
    assert rl.parse_mesh("fsdp:4") == (1, 4, 1)


def test_sandbox_bench_runs(tmp_path):
    text = _run_script("sandbox_bench", "--programs=4", "--repeats=1", tmp_path=tmp_path)
    assert "| rlimits_only | stdio |" in text
