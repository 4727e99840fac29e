"""Partial rollouts with the JAX-sampler FakeEngine: budget cuts, resumption, policy versions,
group completion, truncation, loss masks and the plain-data buffer. The same behaviour against
the real vLLM engine is in test_vllm.py."""

import json

import jax
import numpy as np
import pytest

from k15jax.model import decoder, generation
from k15jax.model.config import ModelConfig
from k15jax.rollout import engines, partial

CFG = ModelConfig(num_hidden_layers=1, vocab_size=64)
EOS = 2


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, decoder.init(CFG, jax.random.key(0)))


def _engine(params):
    return engines.FakeEngine(CFG, params, eos_id=-1)  # never stops: every sample is long


def test_cut_resumed_and_concatenated_equals_uninterrupted(params):
    prompts = [[5, 6, 7], [9, 10]]
    spec = engines.SamplingSpec(n=1, temperature=0.0)
    cfg = partial.PartialConfig(budget=4, max_length=10)
    buf = partial.ReplayBuffer()
    engine = _engine(params)
    done, buf, stats = partial.rollout(
        engine, buf, list(enumerate(prompts)), spec, cfg, iteration=0
    )
    assert done == [] and stats["pending_samples"] == 2
    done, buf, stats = partial.rollout(engine, buf, [], spec, cfg, iteration=1)
    assert done == [] and stats["resumed"] == 2
    done, buf, stats = partial.rollout(engine, buf, [], spec, cfg, iteration=2)
    assert len(done) == 2 and buf.groups == []
    want = generation.generate(CFG, params, prompts, max_new_tokens=10, eos_id=-1)
    for g, ids in zip(done, want.sequences()):
        s = g.samples[0]
        assert s.response_ids == ids
        assert s.finish_reason == "truncated"
        assert [(seg.iteration, len(seg.token_ids)) for seg in s.segments] == [
            (0, 4),
            (1, 4),
            (2, 2),
        ]


def test_group_waits_for_all_samples_and_masks_follow_the_option(params):
    # eos = a token the sharp model emits early for some samples only.
    engine = engines.FakeEngine(CFG, params, eos_id=EOS)
    spec = engines.SamplingSpec(n=4, temperature=1.0)
    cfg = partial.PartialConfig(budget=3, max_length=6)
    buf = partial.ReplayBuffer()
    done, buf, _ = partial.rollout(engine, buf, [(7, [5, 6])], spec, cfg, iteration=0, seed=1)
    if done:  # all four stopped within 3 tokens: nothing to resume
        pytest.skip("every sample finished in the first budget")
    assert buf.groups[0].group_id == 0 and len(buf.groups[0].samples) == 4
    done, buf, _ = partial.rollout(engine, buf, [], spec, cfg, iteration=1, seed=2)
    assert len(done) == 1 and not buf.groups  # max_length 6 = two budgets: all ended now
    g = done[0]
    assert all(s.problem == 7 for s in g.samples)
    for s in g.samples:
        its = [seg.iteration for seg in s.segments]
        all_mask = partial.loss_mask(s, 1, "all")
        cur_mask = partial.loss_mask(s, 1, "current")
        drop_mask = partial.loss_mask(s, 1, "drop_stale")
        assert all_mask == [1.0] * s.length
        # "current": the last iteration's segments; a sample that stopped in iteration 0
        # (its group waited for the others) keeps its tokens rather than an all-zero mask.
        last = its[-1]
        assert cur_mask == [
            float(seg.iteration == last) for seg in s.segments for _ in seg.token_ids
        ]
        assert sum(cur_mask) > 0
        assert drop_mask == ([0.0] * s.length if 0 in its else [1.0] * s.length)


def test_current_segments_of_a_sample_that_ended_while_its_group_waited():
    """loss_segments="current" at iteration 2: a sample still generating keeps its iteration-2
    tokens; one that stopped in iteration 1 (its group waited) keeps its iteration-1 segment
    instead of an all-zero mask; `current_mask_bt` still marks only iteration-2 tokens."""
    seg = lambda it, n: partial.Segment(it, [5] * n, [-0.5] * n)  # noqa: E731
    late = partial.Sample(0, [1, 2], [seg(0, 3), seg(1, 3), seg(2, 2)], "stop")
    early = partial.Sample(0, [1, 2], [seg(0, 3), seg(1, 1)], "stop")
    assert partial.loss_mask(late, 2, "current") == [0.0] * 6 + [1.0] * 2
    assert partial.loss_mask(early, 2, "current") == [0.0] * 3 + [1.0]
    assert partial.loss_mask(early, 2, "all") == [1.0] * 4
    assert partial.loss_mask(early, 2, "drop_stale") == [0.0] * 4
    packed = partial.pack(
        [partial.Group(0, [late, early])], iteration=2, loss_segments="current", pad_to=12
    )
    assert packed.mask_bt[:, 2:10].tolist() == [[0] * 6 + [1] * 2, [0] * 3 + [1] + [0] * 4]
    assert packed.current_mask_bt[:, 2:10].tolist() == [[0] * 6 + [1] * 2, [0] * 8]


def test_buffer_round_trips_through_json(params):
    spec = engines.SamplingSpec(n=2, temperature=1.0)
    cfg = partial.PartialConfig(budget=2, max_length=8)
    _, buf, _ = partial.rollout(
        _engine(params),
        partial.ReplayBuffer(),
        [(0, [5]), (1, [6])],
        spec,
        cfg,
        iteration=0,
        seed=3,
    )
    back = partial.ReplayBuffer.from_json(json.loads(json.dumps(buf.to_json())))
    assert back == buf
    # resuming either copy gives the same next iteration
    a, _, _ = partial.rollout(_engine(params), buf, [], spec, cfg, iteration=1, seed=4)
    b, _, _ = partial.rollout(_engine(params), back, [], spec, cfg, iteration=1, seed=4)
    assert a == b


def test_pack_arrays_and_mismatch(params):
    spec = engines.SamplingSpec(n=2, temperature=0.0)
    cfg = partial.PartialConfig(budget=3, max_length=3)
    done, _, _ = partial.rollout(
        _engine(params), partial.ReplayBuffer(), [(0, [5, 6])], spec, cfg, iteration=0
    )
    packed = partial.pack(done, iteration=0, loss_segments="all", pad_to=8)
    np.testing.assert_array_equal(packed.segment_ids_bt[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(packed.mask_bt[0], [0, 0, 1, 1, 1, 0, 0, 0])
    assert packed.tokens_bt[0, :2].tolist() == [5, 6]
    logp = jax.nn.log_softmax(decoder.apply(CFG, params, packed.tokens_bt))
    trainer = np.zeros_like(packed.rollout_logp_bt)
    trainer[:, 1:] = np.take_along_axis(
        np.asarray(logp[:, :-1]), packed.tokens_bt[:, 1:, None], -1
    )[..., 0]
    response = packed.response_mask_bt > 0
    assert np.abs(packed.rollout_logp_bt - trainer)[response].max() < 1e-4
    with pytest.raises(ValueError, match="pad_to"):
        partial.pack(done, iteration=0, loss_segments="all", pad_to=4)


def test_repeat_end_rule():
    spec = engines.RepeatSpec(min_pattern=2, max_pattern=4, min_count=3)
    assert engines.repeat_end([1, 2, 3, 1, 2, 1, 2, 1, 2, 9], spec) == 9
    assert engines.repeat_end([1, 1, 1, 1, 1, 1], spec) == 6  # "11" three times
    assert engines.repeat_end([1, 2, 3, 4, 5, 6, 7], spec) is None
