"""The plain JAX sampler against step-by-step argmax / categorical draws over `model.apply`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15jax.model import decoder, generation
from k15jax.model.config import ModelConfig

CFG = ModelConfig(num_hidden_layers=1)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, decoder.init(CFG, jax.random.key(0)))


def test_greedy_matches_stepwise_argmax_with_ragged_prompts(params):
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    s = generation.generate(CFG, params, prompts, max_new_tokens=6, eos_id=2)
    for prompt, seq, lp in zip(prompts, s.sequences(), s.logprobs):
        ids = list(prompt)
        for i, t in enumerate(seq):
            logits = decoder.apply(CFG, params, jnp.array([ids]))[0, -1]
            assert int(jnp.argmax(logits)) == t
            np.testing.assert_allclose(lp[i], jax.nn.log_softmax(logits)[t], rtol=1e-5, atol=1e-6)
            ids.append(t)


def test_stops_at_eos_and_pads(params):
    first = generation.generate(CFG, params, [[5]], max_new_tokens=3, eos_id=2).tokens[0, 1]
    s = generation.generate(CFG, params, [[5]], max_new_tokens=5, eos_id=int(first))
    assert s.lengths[0] == 2 and s.finished[0]
    assert list(s.tokens[0, 2:]) == [0, 0, 0]


def test_temperature_sampling_is_seeded_and_varies(params):
    kw = dict(max_new_tokens=8, eos_id=2, temperature=1.0)
    a = generation.generate(CFG, params, [[5]] * 4, key=jax.random.key(1), **kw)
    b = generation.generate(CFG, params, [[5]] * 4, key=jax.random.key(1), **kw)
    c = generation.generate(CFG, params, [[5]] * 4, key=jax.random.key(2), **kw)
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="PRNG key"):
        generation.generate(CFG, params, [[5]], max_new_tokens=2, eos_id=2, temperature=1.0)
