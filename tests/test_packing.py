"""Packing samples into rows by length: the layout, and the loss, gradients and train step of a
packed batch against the same samples one per row (RL and SFT); the first step's own reference;
which samples take the engine's log-probs as reference."""

import jax
import numpy as np
import optax
import pytest

from k15jax.model import decoder, sharding
from k15jax.model.config import ModelConfig
from k15jax.train import losses, packing, sft, train_step, update

CFG = ModelConfig(  # two layers: the second sees what the first let through the segment mask
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    attention_bias=True,
)
K, T, TAU = 4, 24, 0.3


@pytest.fixture(scope="module")
def trainer():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return train_step.make_trainer(CFG, optax.sgd(0.1), train_step.StepConfig(), mesh)


def _samples(seed=0, s=8):
    """Returns one-per-row samples (tokens first, right-padded) as an unpacked Batch."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, T + 1, s)
    lengths[-K:] = rng.integers(3, 8, K)  # a group of short samples: several fit one row
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    tokens = rng.integers(1, CFG.vocab_size, (s, T)).astype(np.int32) * seg
    mask = (seg * (np.arange(T)[None] >= 2)).astype(np.float32)
    return train_step.Batch(
        tokens_bt=tokens,
        mask_bt=mask,
        ref_logp_bt=(-rng.random((s, T)) * 3 * seg).astype(np.float32),
        reward_b=rng.random(s).astype(np.float32),
        segment_ids_bt=seg,
        valid_b=np.ones(s, np.float32),
    )


def _packed(batch: train_step.Batch, *, parts=1, self_ref=None) -> train_step.Batch:
    lay = packing.layout(batch.segment_ids_bt.sum(axis=1), cols=T, parts=parts)
    return train_step.Batch(
        tokens_bt=packing.pack(batch.tokens_bt, lay),
        mask_bt=packing.pack(batch.mask_bt, lay),
        ref_logp_bt=packing.pack(batch.ref_logp_bt, lay),
        reward_b=batch.reward_b,
        segment_ids_bt=packing.segment_ids(lay),
        valid_b=batch.valid_b,
        sample_bt=packing.sample_ids(lay),
        self_ref_b=self_ref,
    )


def _close(got, want):
    """Equal to float32 summation-order noise: packing sums a gradient entry over different rows
    in a different order, ~1e-7 absolute on entries of order 1, so the tolerance is relative to
    each leaf's largest entry (1e-5 of it), not to each entry."""

    def one(a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

    jax.tree.map(one, got, want)


def _loss(params, b: train_step.Batch):
    logp = train_step.sequence_logprobs(CFG, params, b.tokens_bt, b.segment_ids_bt)
    return losses.mirror_descent_loss(
        logp, b.ref_logp_bt, b.mask_bt, b.reward_b, group_size=K, tau=TAU,
        valid_b=b.valid_b, sample_bt=b.sample_bt, self_ref_b=b.self_ref_b,
    )  # fmt: skip


def test_layout_fits_rows_and_round_trips():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 30, 40)
    lay = packing.layout(lengths, cols=32, parts=2, multiple=4)
    assert lay.rows % 4 == 0 and lay.rows <= 40
    x = rng.integers(1, 100, (40, 32)) * (np.arange(32)[None] < lengths[:, None])
    packed = packing.pack(x, lay)
    np.testing.assert_array_equal(packing.unpack(packed, lay, 32), x)
    seg, ids = packing.segment_ids(lay), packing.sample_ids(lay)
    assert seg.max() > 1  # rows do hold several samples
    for j in np.flatnonzero(lengths):
        part = j // 20
        r, a, n = lay.row_s[j], lay.start_s[j], lengths[j]
        assert part * lay.rows // 2 <= r < (part + 1) * lay.rows // 2  # a part keeps its rows
        assert (ids[r, a : a + n] == j % 20).all() and len(set(seg[r, a : a + n])) == 1
    assert (np.bincount(lay.row_s[lay.row_s >= 0], minlength=lay.rows) >= 0).all()
    with pytest.raises(ValueError, match="does not fit a row of 32"):
        packing.layout([33], cols=32)


def test_buckets_are_few_and_cover():
    for cap, shapes in ((7, 2), (8, 2), (20, 5), (128, 8)):
        sizes = [packing.bucket(n, cap) for n in range(1, cap + 1)]
        assert len(set(sizes)) == shapes and max(sizes) == cap
        assert all(size >= n for n, size in enumerate(sizes, 1))


def test_packed_loss_and_gradients_equal_unpacked():
    params = decoder.init(CFG, jax.random.key(0))
    batch = _samples()
    packed = _packed(batch)
    assert packed.tokens_bt.shape[0] < batch.tokens_bt.shape[0]  # packing saved rows
    grad = jax.jit(jax.value_and_grad(_loss, has_aux=True))
    (want, want_m), want_g = grad(params, batch)
    (got, got_m), got_g = grad(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key in want_m:
        np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-5, atol=1e-6)
    _close(got_g, want_g)


def test_packed_train_step_equals_unpacked(micro=2):  # packed in two parts (micro-batches)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = optax.sgd(0.1)
    step_cfg = train_step.StepConfig(tau=TAU, group_size=K, micro_batches=micro)
    trainer = train_step.make_trainer(CFG, opt, step_cfg, mesh)
    params = decoder.init(CFG, jax.random.key(0))
    batch = _samples(seed=2, s=16)
    want_state, want = train_step.checked_step(
        trainer, train_step.init_state(params, CFG, opt, mesh), batch, where="test"
    )
    got_state, got = train_step.checked_step(
        trainer,
        train_step.init_state(params, CFG, opt, mesh),
        _packed(batch, parts=micro),
        where="test",
    )
    for key in ("loss", "grad_norm", "delta_abs_mean"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    _close(jax.device_get(got_state.params), jax.device_get(want_state.params))


def test_own_reference_equals_a_separate_pass():
    params = decoder.init(CFG, jax.random.key(3))
    batch = _samples(seed=4)
    own = jax.jit(train_step.sequence_logprobs, static_argnums=0)(
        CFG, params, batch.tokens_bt, batch.segment_ids_bt
    )
    separate = batch.replace(ref_logp_bt=np.asarray(own))
    engine = np.where(batch.mask_bt > 0, np.asarray(own) + 0.01, np.nan).astype(np.float32)
    engine[0, 2] = np.nan  # a token the engine has no log-prob for is left out of the gap
    selfref = _packed(batch.replace(ref_logp_bt=engine), self_ref=np.ones(8, np.float32))
    grad = jax.jit(jax.value_and_grad(_loss, has_aux=True))
    (want, _), want_g = grad(params, separate)
    (got, m), got_g = grad(params, selfref)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _close(got_g, want_g)
    np.testing.assert_allclose(m["engine_gap_mean"], 0.01, rtol=1e-3)
    np.testing.assert_allclose(m["engine_gap_max"], 0.01, rtol=1e-3)


def _groups_packed(seed=5):
    """Returns the update's Samples of 8: rows 5 and 6 hold a segment of an older iteration."""
    batch = _samples(seed=seed)
    rng = np.random.default_rng(seed)
    response = batch.mask_bt
    current = response.copy()
    current[5, 2:4] = 0  # resumed samples: their first tokens come from iteration - 1
    current[6, 2:3] = 0
    engine = np.where(response > 0, -7.0 - rng.random(response.shape), 0).astype(np.float32)
    return update.Samples(
        tokens_bt=batch.tokens_bt,
        mask_bt=response,
        segment_ids_bt=batch.segment_ids_bt,
        engine_logp_bt=engine,
        current_mask_bt=current,
        reward_b=batch.reward_b,
    )


@pytest.mark.parametrize(("gap", "engine_rows"), [(1e-5, [2, 3, 4, 7]), (1.0, []), (None, [])])
def test_engine_reference_only_for_current_segments(trainer, gap, engine_rows):
    params = decoder.init(CFG, jax.random.key(6))
    packed = _groups_packed()
    ref, recompute = update.reference(
        trainer, params, packed, first=2, gap=gap, max_gap=1e-3, block=2
    )
    trainer_logp = np.asarray(trainer.logprobs(params, packed.tokens_bt, packed.segment_ids_bt)) * (
        packed.segment_ids_bt > 0
    )
    loss = packed.mask_bt > 0
    for j in range(8):
        if j < 2:  # the first step: its own pass; the engine's values only where current
            assert not recompute[j]
            np.testing.assert_array_equal(ref[j][loss[j]], packed.engine_logp_bt[j][loss[j]])
        elif j in engine_rows:
            assert not recompute[j]
            np.testing.assert_array_equal(ref[j][loss[j]], packed.engine_logp_bt[j][loss[j]])
        else:  # older segments (rows 5, 6) always, the rest when the engine is not trusted
            assert recompute[j]
            np.testing.assert_allclose(ref[j][loss[j]], trainer_logp[j][loss[j]], atol=1e-5)
    assert recompute[5] and recompute[6]


def test_packed_rl_update_equals_unpacked_steps():
    """`update.rl_update` (optimizer reset, samples packed by length, the first step its own
    reference, later steps θ_i's log-probs) ends where plain one-sample-per-row steps from a fresh
    optimizer, with θ_i's log-probs as every reference, end."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    # momentum SGD: its trace makes the reset matter and, linear in the gradient, it keeps
    # packing's summation-order noise at rounding size (Adam's 1/sqrt(v) enlarges it)
    opt = optax.sgd(0.1, momentum=0.9)
    trainer = train_step.make_trainer(CFG, opt, train_step.StepConfig(tau=TAU, group_size=K), mesh)
    params = decoder.init(CFG, jax.random.key(7))
    samples = _groups_packed(seed=8)
    # a state whose optimizer has moved: the update must start from a fresh optimizer
    batch0 = _samples(seed=9)
    moved, _ = train_step.checked_step(
        trainer, train_step.init_state(params, CFG, opt, mesh), batch0, where="warm"
    )
    theta_i = jax.device_get(moved.params)
    got, m = update.rl_update(
        trainer, moved, samples, rows_per_step=K, micro_batches=1, shards=1,
        gap=None, max_gap=1e-3, where="test",
    )  # fmt: skip
    assert m["optimizer_steps"] == 2 and m["reference_recomputed"] == 0.5  # rows 4-7
    ref = np.asarray(trainer.logprobs(theta_i, samples.tokens_bt, samples.segment_ids_bt))
    want = train_step.init_state(theta_i, CFG, opt, mesh)
    for rows in (slice(0, K), slice(K, 2 * K)):
        plain = train_step.Batch(
            tokens_bt=samples.tokens_bt[rows],
            mask_bt=samples.mask_bt[rows],
            ref_logp_bt=ref[rows],
            reward_b=samples.reward_b[rows],
            segment_ids_bt=samples.segment_ids_bt[rows],
            valid_b=np.ones(K, np.float32),
        )
        want, _ = train_step.checked_step(trainer, want, plain, where="reference")
    _close(jax.device_get(got.params), jax.device_get(want.params))
    _close(jax.device_get(got.opt_state), jax.device_get(want.opt_state))


def test_packed_sft_batch_equals_unpacked():
    """An SFT batch packed into rows trains exactly like the same examples one per row."""
    rng = np.random.default_rng(3)
    examples = [  # prompts of 2-5 tokens, responses of 1-14: several fit one row of T
        (list(rng.integers(1, CFG.vocab_size, rng.integers(2, 6))),
         list(rng.integers(1, CFG.vocab_size, rng.integers(1, 15))))
        for _ in range(10)
    ]  # fmt: skip
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = optax.sgd(0.1)
    step_cfg = train_step.StepConfig(objective="sft", group_size=1)
    trainer = train_step.make_trainer(CFG, opt, step_cfg, mesh)
    params = decoder.init(CFG, jax.random.key(0))
    kw = dict(step=4, seed=1, batch_size=12, seq_len=T)
    plain = sft.batch(examples, pack=False, **kw)
    packed = sft.batch(examples, multiple=2, **kw)
    assert packed.tokens_bt.shape[0] < plain.tokens_bt.shape[0]  # packing saved rows
    assert packed.tokens_bt.shape[0] % 2 == 0 and packed.segment_ids_bt.max() > 1
    assert packed.mask_bt.sum() == plain.mask_bt.sum()  # the same loss tokens
    np.testing.assert_array_equal(  # padding rows (if any) are marked invalid
        packed.valid_b, (packed.segment_ids_bt > 0).any(axis=1).astype(np.float32)
    )
    results = [
        train_step.checked_step(
            trainer, train_step.init_state(params, CFG, opt, mesh), b, where="test"
        )
        for b in (plain, packed)
    ]
    (want_state, want), (got_state, got) = results
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    _close(jax.device_get(got_state.params), jax.device_get(want_state.params))
