"""The k1.5 length reward against hand-computed values (spec §2)."""

import numpy as np
import pytest

from k15jax.rewards import length


@pytest.mark.parametrize(
    "lengths, correct, want",
    [
        # min 10, max 30: λ = 0.5 - (len-10)/20 -> [0.5, 0, -0.5, 0]; wrong ones get min(0, λ)
        ([10, 20, 30, 20], [1, 1, 0, 0], [0.5, 0.0, -0.5, 0.0]),
        # ties at the minimum: both shortest correct get +0.5; the short wrong one gets 0
        ([5, 5, 15, 5], [1, 1, 1, 0], [0.5, 0.5, -0.5, 0.0]),
        # all lengths equal: 0 for everyone, right or wrong
        ([7, 7, 7, 7], [1, 0, 1, 0], [0.0, 0.0, 0.0, 0.0]),
        # all wrong: never positive; λ = [0.5, 0.25, -0.5, 0] -> [0, 0, -0.5, 0]
        ([0, 10, 40, 20], [0, 0, 0, 0], [0.0, 0.0, -0.5, 0.0]),
        # all right: the full λ
        ([0, 10, 40, 20], [1, 1, 1, 1], [0.5, 0.25, -0.5, 0.0]),
    ],
)
def test_length_reward_table(lengths, correct, want):
    got = length.length_reward(np.array(lengths), np.array(correct, bool), group_size=4)
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_groups_are_independent():
    lengths = np.array([10, 20, 30, 20, 7, 7, 7, 7])
    correct = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    got = length.length_reward(lengths, correct, group_size=4)
    np.testing.assert_allclose(got, [0.5, 0, -0.5, 0, 0, 0, 0, 0], atol=1e-7)


def test_weight_schedule_and_total():
    kw = dict(weight=0.2, warmup_iterations=3)
    assert [length.length_weight(i, **kw) for i in range(5)] == [0, 0, 0, 0.2, 0.2]
    total = length.total_reward(
        np.array([1.0, 1.0]), np.array([5, 15]), np.array([True, True]), group_size=2, weight=0.2
    )
    np.testing.assert_allclose(total, [1.1, 0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        length.length_reward(np.array([1, 2, 3]), np.array([1, 1, 1], bool), group_size=2)
