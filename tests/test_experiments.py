"""Every experiment script builds its configuration from default flags, and flags reach it."""

import dataclasses

from absl import flags

from experiments import bench, convert, eval, rl, sft  # noqa: F401 - define their flags
from k15jax import loop


def _parse(*args):
    f = flags.FLAGS
    f.unparse_flags()
    f(["prog", *args])


def test_default_flags_give_the_default_config():
    _parse()
    assert rl.make_config() == loop.RunConfig()


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
    )
    cfg = rl.make_config()
    assert cfg.rl.tau == 0.05 and cfg.rl.samples_per_prompt == 16
    assert (cfg.partial.budget, cfg.partial.max_length) == (100, 200)
    assert cfg.length.weight == 0.3 and cfg.sampler.curriculum_iterations == 4
    assert cfg.vllm.kv_cache_memory_bytes is None
    assert dataclasses.replace(cfg.task, data=None, reward="task") == loop.RunConfig().task
    _parse()
