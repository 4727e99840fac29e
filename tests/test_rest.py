"""The ReST objective (`losses.rest_loss`, objective "rest"): loss and gradient against numpy,
packing, micro-batching, unkept samples, the sign of a step, and the run's config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k15jax.model import decoder, sharding
from k15jax.model.config import ModelConfig
from k15jax.run import run_config
from k15jax.train import losses, packing, train_step, update

B, T, K = 8, 6, 4  # 2 groups of K = 4 samples
THRESHOLD = 0.5
# Rewards as the run gives them: right with a length reward (1.05, 0.97), wrong (0, -0.04),
# truncated (-0.5). The second group is padding (valid 0) with rewards that would be kept.
REWARD = np.array([1.05, 0.0, -0.5, 0.97, 1.0, 1.0, 0.0, 1.0], np.float32)
VALID = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    logp = -rng.random((B, T)).astype(np.float32) * 3
    ref = logp + 0.2 * rng.normal(size=(B, T)).astype(np.float32)
    mask = np.zeros((B, T), np.float32)
    for j, n in enumerate([3, 5, 2, 4, 5, 1, 3, 2]):
        mask[j, 1 : 1 + n] = 1  # token 0 is the prompt
    return logp, ref, mask


def _rest(logp, ref, mask, reward=REWARD, valid=VALID, **kw):
    return losses.rest_loss(
        logp, ref, mask, reward, group_size=K, threshold=THRESHOLD, valid_b=valid, **kw
    )


def test_loss_gradient_and_metrics_equal_numpy(problem):
    logp, ref, mask = problem
    (loss, m), g = jax.value_and_grad(_rest, has_aux=True)(logp, ref, mask)
    kept = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32)  # reward >= 0.5 and valid
    n = (kept[:, None] * mask).sum()
    np.testing.assert_allclose(loss, -(kept[:, None] * mask * logp).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(g, -kept[:, None] * mask / n, rtol=1e-6)
    np.testing.assert_allclose(m["nll"], loss, rtol=1e-6)
    assert float(m["kept_fraction"]) == 0.5  # 2 of the 4 valid samples
    delta = (mask * (logp - ref)).sum(axis=1)[:4]
    np.testing.assert_allclose(m["delta_mean"], delta.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["delta_abs_mean"], np.abs(delta).mean(), rtol=1e-5)
    assert float(m["zero_variance_groups"]) == 0.0  # the valid group's rewards differ
    for key in ("delta_mean", "delta_abs_mean", "zero_variance_groups"):
        assert key in m  # the keys `update.STEP_METRICS` reads from every step's loss


def test_unkept_samples_get_no_gradient_and_do_not_move_the_loss(problem):
    logp, ref, mask = problem
    g = jax.grad(lambda x: _rest(x, ref, mask)[0])(logp)
    unkept = np.array([0, 1, 1, 0, 1, 1, 1, 1], bool)
    np.testing.assert_array_equal(g[unkept], 0.0)
    assert np.abs(g[~unkept]).max() > 0
    changed = logp.copy()
    changed[1] = -50.0  # a wrong sample's tokens
    changed[2] = -np.inf  # a truncated one's, not even finite
    changed[5] = 3.0  # a padding row's
    np.testing.assert_array_equal(_rest(changed, ref, mask)[0], _rest(logp, ref, mask)[0])


def test_nothing_kept_gives_zero_loss_and_gradient(problem):
    logp, ref, mask = problem
    wrong = np.array([0.0, -0.04, -0.5, 0.0, 1.0, 1.0, 1.0, 1.0], np.float32)  # padding kept-ish
    (loss, m), g = jax.value_and_grad(_rest, has_aux=True)(logp, ref, mask, wrong)
    assert float(loss) == 0.0 and float(m["kept_fraction"]) == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(np.asarray(v)).all() for v in m.values())


def test_delta_metrics_equal_mirror_descent_with_self_reference(problem):
    # The iteration's first step: π_θi is the step's own log-probs (`self_ref_b`), the ref
    # array holds the engine's log-probs with NaN where it has none. The console's |δ| and the
    # engine gap must mean what they mean under mirror descent.
    logp, ref, mask = problem
    engine = ref.copy()
    engine[0, 2] = np.nan
    self_ref = np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32)
    _, m = _rest(logp, engine, mask, self_ref_b=self_ref)
    _, want = losses.mirror_descent_loss(
        logp, engine, mask, REWARD, group_size=K, tau=0.1, valid_b=VALID, self_ref_b=self_ref
    )
    for key in ("delta_mean", "delta_abs_mean", "zero_variance_groups", "engine_gap_mean"):
        np.testing.assert_allclose(m[key], want[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(m["engine_gap_max"], want["engine_gap_max"], rtol=1e-6)
    delta = (mask * (logp - ref)).sum(axis=1)
    delta[:2] = 0  # samples 0, 1 are their own reference
    np.testing.assert_allclose(m["delta_abs_mean"], np.abs(delta[:4]).mean(), rtol=1e-5)
    assert np.isfinite(float(m["delta_mean"]))


def test_packed_rows_equal_unpacked(problem):
    logp, ref, mask = problem
    lengths = (mask.sum(axis=1) + 1).astype(int)  # prompt token + response
    lay = packing.layout(lengths, cols=2 * T)
    assert len(set(lay.row_s)) < B  # several samples share a row
    sample_bt = packing.sample_ids(lay)
    self_ref = np.array([1, 0, 1, 0, 0, 0, 0, 0], np.float32)

    def packed(logp_rc):
        return _rest(
            logp_rc,
            packing.pack(ref, lay),
            packing.pack(mask, lay),
            sample_bt=sample_bt,
            self_ref_b=self_ref,
        )

    (got, m_got), g_packed = jax.value_and_grad(packed, has_aux=True)(packing.pack(logp, lay))
    rest = lambda x: _rest(x, ref, mask, self_ref_b=self_ref)  # noqa: E731
    (want, m_want), g_want = jax.value_and_grad(rest, has_aux=True)(logp)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for key in m_want:
        np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(packing.unpack(np.asarray(g_packed), lay, T), g_want * (mask > 0))
    np.testing.assert_array_equal(np.asarray(g_want)[mask == 0], 0.0)


# ----------------------------------------------------------------------------- the train step

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    attention_bias=True,
)
# Momentum SGD is linear in the gradient: micro-batched and whole steps agree to float32
# reduction-order noise (Adam would amplify that noise on near-zero gradient entries).
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def _samples(seed=0, b=16, t=12) -> update.Samples:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, t + 1, b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    tokens = rng.integers(3, CFG.vocab_size, (b, t)).astype(np.int32) * seg
    mask = (seg * (np.arange(t)[None] >= 3)).astype(np.float32)
    # The first micro-batch (rows 0-7) keeps 5 samples, the second 1: unequal kept tokens; the
    # last group's rewards are all equal.
    reward = np.array([1, 0, 1, 1, 0, 1, 1, 0, 0, -0.5, 0, 1.02, 0, 0, 0, 0], np.float32)
    return update.Samples(
        tokens_bt=tokens,
        mask_bt=mask,
        segment_ids_bt=seg,
        engine_logp_bt=-rng.random((b, t)).astype(np.float32) * mask,
        current_mask_bt=mask,
        reward_b=reward,
    )


def _unpacked(s: update.Samples) -> train_step.Batch:
    return train_step.Batch(
        tokens_bt=s.tokens_bt,
        mask_bt=s.mask_bt,
        ref_logp_bt=s.engine_logp_bt,
        reward_b=s.reward_b,
        segment_ids_bt=s.segment_ids_bt,
        valid_b=np.ones(len(s.reward_b), np.float32),
    )


def _step(batch, micro, lr_opt=OPT):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    step_cfg = train_step.StepConfig(group_size=K, micro_batches=micro, objective="rest")
    params = decoder.init(CFG, jax.random.key(0))
    step = train_step.make_train_step(CFG, lr_opt, step_cfg, mesh)
    state, m = step(train_step.init_state(params, CFG, lr_opt, mesh), batch)
    return params, jax.device_get(state.params), {k: float(v) for k, v in m.items()}


def test_packed_micro_batched_step_equals_one_unpacked_step():
    # The run's path: samples packed by `update.packed_batch` in 2 micro-batches whose kept
    # token counts differ, against one step on the unpacked rows.
    s = _samples()
    packed, _ = update.packed_batch(
        s, s.engine_logp_bt, np.arange(16), 16, 2, shards=1, self_ref=False
    )
    params, one, m1 = _step(_unpacked(s), micro=1)
    _, two, m2 = _step(packed, micro=2)
    logp = train_step.sequence_logprobs(CFG, params, s.tokens_bt, s.segment_ids_bt)
    kept = (s.reward_b >= THRESHOLD)[:, None] * s.mask_bt
    want = -float(np.sum(kept * np.asarray(logp)) / kept.sum())  # independent NLL
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    for key in ("nll", "kept_fraction", "delta_mean", "delta_abs_mean", "zero_variance_groups"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert m1["kept_fraction"] == 6 / 16 and m1["zero_variance_groups"] == 0.25
    # f32 rtol 1e-4 (composite): the micro-batch sum and packing reorder float32 reductions.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), two, one)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), one, params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_step_on_a_batch_that_keeps_nothing_is_finite_and_zero():
    s = _samples()
    batch = _unpacked(s)
    batch = batch.replace(reward_b=np.where(s.reward_b >= THRESHOLD, 0.0, s.reward_b))
    params, after, m = _step(batch, micro=2)
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["skipped"] == 0
    jax.tree.map(np.testing.assert_array_equal, after, jax.device_get(params))


def test_a_step_raises_the_log_prob_of_the_kept_sample():
    # One group of 4: sample 0 (X) is right, the rest wrong. ReST steps raise log π(X).
    rng = np.random.default_rng(1)
    t = 8
    tokens = rng.integers(3, CFG.vocab_size, (K, t)).astype(np.int32)
    tokens[:, :2] = [1, 5]  # one prompt
    seg = np.ones((K, t), np.int32)
    mask = (np.arange(t)[None] >= 2).astype(np.float32) * np.ones((K, 1), np.float32)
    batch = train_step.Batch(
        tokens_bt=tokens,
        mask_bt=mask,
        ref_logp_bt=np.zeros((K, t), np.float32),
        reward_b=np.array([1.0, 0.0, 0.0, -0.5], np.float32),
        segment_ids_bt=seg,
        valid_b=np.ones(K, np.float32),
    )
    seq_logp = lambda p: np.sum(  # noqa: E731
        mask * np.asarray(train_step.sequence_logprobs(CFG, p, tokens, seg)), axis=1
    )
    params, after, m = _step(batch, micro=1, lr_opt=train_step.make_optimizer(1e-2))
    before, now = seq_logp(params), seq_logp(after)
    assert m["kept_fraction"] == 0.25
    assert now[0] > before[0] + 0.1, (before, now)


# ------------------------------------------------------------------------------ the run config


def test_rl_config_takes_rest_and_rejects_unknown_objectives():
    cfg = run_config.RlConfig(objective="rest")
    step_cfg = cfg.step_config()
    assert step_cfg.objective == "rest" and step_cfg.rest_threshold == THRESHOLD
    assert run_config.RlConfig().step_config().objective == "mirror_descent"
    assert (
        run_config.RlConfig(objective="rest", rest_threshold=0.9).step_config().rest_threshold
        == 0.9
    )
    with pytest.raises(ValueError, match="'ppo'"):
        run_config.RlConfig(objective="ppo")
    with pytest.raises(ValueError, match="'sft'"):  # a train-step objective, but not an RL one
        run_config.RlConfig(objective="sft")


def test_rest_loss_is_float32_from_bfloat16(problem):
    logp, ref, mask = problem
    loss, m = _rest(jnp.asarray(logp, jnp.bfloat16), ref, mask)
    assert loss.dtype == jnp.float32 and m["nll"].dtype == jnp.float32
