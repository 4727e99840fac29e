"""The sharded train step: mesh invariance, PartitionSpec snapshot, NaN refusal, optimizer reset,
micro-batching, checkpoints, and a short on-policy loop that raises the reward."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from k15jax.infra import checkpoint
from k15jax.model import decoder, generation, sharding
from k15jax.model.config import KernelConfig, ModelConfig
from k15jax.train import train_step

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attention_bias=True,
)
# Chunked log-probs (5 rows of logits at a time) in the micro-batched step.
CHUNKED = dataclasses.replace(
    CFG, kernels=KernelConfig(logprob_impl="xla_chunked", logprob_chunk=5)
)
STEP = train_step.StepConfig(tau=0.5, group_size=4, micro_batches=2)
# Momentum SGD is linear in the gradient, so sharded and single-device runs agree to float32
# reduction-order noise. Adam divides by sqrt(v): for near-zero gradient entries that noise grows
# to ~0.4% of a step (measured 8e-5 against 2e-2 steps), which would force a loose tolerance.
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


def _batch(seed=0, b=16, t=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(6, t + 1, b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    mask = seg * (np.arange(t)[None] >= 4)
    ref = -rng.random((b, t)).astype(np.float32) * 3
    reward = rng.integers(0, 2, b).astype(np.float32)
    return train_step.Batch(
        tokens_bt=tokens,
        mask_bt=mask.astype(np.float32),
        ref_logp_bt=ref,
        reward_b=reward,
        segment_ids_bt=seg,
        valid_b=np.ones(b, np.float32),
    )


def _run(mesh_shape, devices, steps=2):
    mesh = sharding.make_mesh(mesh_shape, devices)
    params = decoder.init(CFG, jax.random.key(0))
    state = train_step.init_state(params, CHUNKED, OPT, mesh)
    step = train_step.make_train_step(CHUNKED, OPT, STEP, mesh)
    losses_ = []
    for i in range(steps):
        state, m = step(state, _batch(i))
        losses_.append(float(m["loss"]))
    return losses_, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device_run():
    return _run((1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(single_device_run, mesh_shape):
    assert len(jax.devices()) == 8
    want_loss, want_params, _ = single_device_run
    got_loss, got_params, state = _run(mesh_shape, jax.devices())
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_params, want_params
    )
    q = state.params["layers"][0]["attn"]["q_proj"]["kernel"]
    assert (
        q.sharding.spec
        == sharding.param_specs(CFG, q.sharding.mesh)["layers"][0]["attn"]["q_proj"]["kernel"]
    )


def test_partition_spec_snapshot():
    mesh = sharding.make_mesh((2, 2, 2))
    specs = sharding.param_specs(CFG, mesh)
    layer = specs["layers"][1]
    want = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        # FSDP shards every parameter: those without an `embed` dimension on their largest one.
        "final_norm.scale": P("fsdp"),
        "input_norm.scale": P("fsdp"),
        "q_proj.kernel": P("fsdp", "tensor"),
        "q_proj.bias": P(("tensor", "fsdp")),
        "k_proj.kernel": P("fsdp", "tensor"),
        "v_proj.bias": P(("tensor", "fsdp")),
        "o_proj.kernel": P("tensor", "fsdp"),
        "gate_proj.kernel": P("fsdp", "tensor"),
        "up_proj.kernel": P("fsdp", "tensor"),
        "down_proj.kernel": P("tensor", "fsdp"),
    }
    got = {
        "embed": specs["embed"],
        "lm_head": specs["lm_head"],
        "final_norm.scale": specs["final_norm"]["scale"],
        "input_norm.scale": layer["input_norm"]["scale"],
        "q_proj.kernel": layer["attn"]["q_proj"]["kernel"],
        "q_proj.bias": layer["attn"]["q_proj"]["bias"],
        "k_proj.kernel": layer["attn"]["k_proj"]["kernel"],
        "v_proj.bias": layer["attn"]["v_proj"]["bias"],
        "o_proj.kernel": layer["attn"]["o_proj"]["kernel"],
        "gate_proj.kernel": layer["mlp"]["gate_proj"]["kernel"],
        "up_proj.kernel": layer["mlp"]["up_proj"]["kernel"],
        "down_proj.kernel": layer["mlp"]["down_proj"]["kernel"],
    }
    assert got == want
    # Every parameter follows the rule table through its logical names.
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat_names = jax.tree.leaves(decoder.logical_axes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    for spec, names in zip(flat_specs, flat_names):
        rules = tuple(sharding.LOGICAL_AXIS_RULES[n] for n in names)
        if "embed" in names:
            assert tuple(spec) == rules
        else:  # the rule's axes, plus fsdp appended to exactly one dimension
            as_tuple = lambda a: () if a is None else (a,) if isinstance(a, str) else tuple(a)
            extra = [as_tuple(a)[len(as_tuple(r)) :] for a, r in zip(spec, rules)]
            assert sorted(extra) == sorted([("fsdp",)] + [()] * (len(names) - 1)), (names, spec)


def test_micro_batches_match_one_batch_and_reset(single_device_run):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = decoder.init(CFG, jax.random.key(0))
    one = train_step.StepConfig(tau=0.5, group_size=4, micro_batches=1)
    step = train_step.make_train_step(CFG, OPT, one, mesh)
    state = train_step.init_state(params, CFG, OPT, mesh)
    state, m = step(state, _batch(0))
    want_loss, _, _ = single_device_run
    np.testing.assert_allclose(float(m["loss"]), want_loss[0], rtol=1e-5)
    # The reset returns the optimizer to its initial state without touching params.
    reset = train_step.reset_optimizer(state, OPT)
    fresh = OPT.init(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), reset.opt_state, fresh)
    assert reset.params is state.params
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(state.opt_state))


def test_non_finite_update_is_refused():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = decoder.init(CFG, jax.random.key(0))
    step = train_step.make_train_step(CFG, OPT, STEP, mesh)
    state = train_step.init_state(params, CFG, OPT, mesh)
    before_params = jax.device_get(state.params)
    before_opt = jax.device_get(state.opt_state)
    bad = _batch(0)
    bad = bad.replace(reward_b=bad.reward_b.copy())
    bad.reward_b[3] = np.nan
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), before_opt)
    state, m = step(state, _batch(1))
    assert int(m["skipped"]) == 0 and int(state.step) == 1


def test_checkpoint_round_trip_and_interrupted_save(single_device_run, tmp_path, monkeypatch):
    _, _, state = single_device_run
    host = jax.device_get(state)
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, 1, host, {"iteration": 1, "history": [0.5]})
    restored, extra = checkpoint.restore(d, 1, host)
    assert extra == {"iteration": 1, "history": [0.5]}
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, host
    )

    import orbax.checkpoint as ocp

    real_save = ocp.StandardCheckpointer.save

    def crash(self, path, *a, **k):
        real_save(self, path, *a, **k)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(d, 2, jax.tree.map(lambda x: x, host), {"iteration": 2})
    monkeypatch.undo()
    assert checkpoint.latest_step(d) == 1
    assert sorted(os.listdir(d)) == ["step_1"]
    again, extra = checkpoint.restore(d, 1, host)
    assert extra["iteration"] == 1


def test_on_policy_loop_raises_reward():
    """k samples per prompt from the JAX sampler, 0/1 rule reward, optimizer reset per iteration."""
    cfg = ModelConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attention_bias=True,
    )
    opt = train_step.make_optimizer(3e-3)
    step_cfg = train_step.StepConfig(tau=0.1, group_size=8, micro_batches=1)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    step = train_step.make_train_step(cfg, opt, step_cfg, mesh)
    state = train_step.init_state(decoder.init(cfg, jax.random.key(0)), cfg, opt, mesh)
    prompts = [[1, 5], [1, 6]]
    k, n_new = 8, 4
    good = set(range(8))  # reward 1 when the first generated token is < 8: about 1/4 at start
    logp_fn = jax.jit(lambda p, tok, seg: train_step.sequence_logprobs(cfg, p, tok, seg))
    rewards = []
    for it in range(12):
        flat = [p for p in prompts for _ in range(k)]
        s = generation.generate(
            cfg,
            state.params,
            flat,
            max_new_tokens=n_new,
            eos_id=-1,
            temperature=1.0,
            key=jax.random.key(100 + it),
        )
        tokens = np.concatenate([np.array(flat), s.tokens], axis=1).astype(np.int32)
        reward = np.array([float(row[0] in good) for row in s.tokens], np.float32)
        rewards.append(reward.mean())
        seg = np.ones_like(tokens)
        mask = np.zeros(tokens.shape, np.float32)
        mask[:, 2:] = 1
        ref = np.asarray(logp_fn(state.params, tokens, seg))  # π_{θ_i}, recomputed by the trainer
        state = train_step.reset_optimizer(state, opt)
        batch = train_step.Batch(
            tokens_bt=tokens,
            mask_bt=mask,
            ref_logp_bt=ref,
            reward_b=reward,
            segment_ids_bt=seg,
            valid_b=np.ones(len(reward), np.float32),
        )
        for _ in range(4):
            state, m = step(state, batch)
    early, late = np.mean(rewards[:3]), np.mean(rewards[-3:])
    print(f"\nmean reward first 3 iterations {early:.2f}, last 3 {late:.2f}")
    assert late > early + 0.3


def test_sft_objective_lowers_masked_nll():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    opt = train_step.make_optimizer(1e-2)
    step_cfg = train_step.StepConfig(objective="sft", group_size=1)
    step = train_step.make_train_step(CFG, opt, step_cfg, mesh)
    state = train_step.init_state(decoder.init(CFG, jax.random.key(0)), CFG, opt, mesh)
    b = _batch(0)
    batch = train_step.Batch.for_sft(b.tokens_bt, b.mask_bt, b.segment_ids_bt)
    logp = train_step.sequence_logprobs(CFG, state.params, b.tokens_bt, b.segment_ids_bt)
    want = -np.sum(np.asarray(logp) * b.mask_bt) / b.mask_bt.sum()  # independent NLL
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    for _ in range(5):
        state, m2 = step(state, batch)
    assert float(m2["loss"]) < 0.7 * float(m["loss"])


@pytest.mark.parametrize("objective", ["mirror_descent", "sft"])
def test_micro_batches_with_unequal_padding_give_the_one_batch_update(objective):
    # Rows 12..15 are padding, all in the second micro-batch: it holds 4 real rows against the
    # first one's 8 (and fewer tokens). Averaging the two micro-batch means would weight each
    # real row of the second twice; the update must equal one batch over the 12 real rows.
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = decoder.init(CFG, jax.random.key(0))
    batch = _batch(3)
    batch = batch.replace(valid_b=(np.arange(16) < 12).astype(np.float32))
    if objective == "sft":
        batch = train_step.Batch.for_sft(
            batch.tokens_bt, batch.mask_bt, batch.segment_ids_bt, batch.valid_b
        )
    group = 4 if objective == "mirror_descent" else 1
    results = []
    for micro in (1, 2):
        step_cfg = train_step.StepConfig(
            tau=0.5, group_size=group, micro_batches=micro, objective=objective
        )
        step = train_step.make_train_step(CFG, OPT, step_cfg, mesh)
        state, m = step(train_step.init_state(params, CFG, OPT, mesh), batch)
        results.append((float(m["loss"]), jax.device_get(state.params)))
    (loss_1, params_1), (loss_2, params_2) = results
    # The loss of the real rows alone, by an independent route: drop the padding rows.
    real = jax.tree.map(lambda x: x[:12], batch)
    step_cfg = train_step.StepConfig(tau=0.5, group_size=group, objective=objective)
    step = train_step.make_train_step(CFG, OPT, step_cfg, mesh)
    _, m_real = step(train_step.init_state(params, CFG, OPT, mesh), real)
    np.testing.assert_allclose(loss_1, float(m_real["loss"]), rtol=1e-5)
    np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5)
    # f32 rtol 1e-4 (composite): the sum over micro-batches reorders float32 reductions.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), params_2, params_1
    )


def test_state_is_built_on_the_mesh_with_the_step_shardings():
    mesh = sharding.make_mesh((2, 2, 2))
    state = train_step.init_state(decoder.init(CFG, jax.random.key(0)), CFG, OPT, mesh)
    want = train_step.state_shardings(CFG, OPT, mesh)
    got_leaves, want_leaves = jax.tree.leaves(state), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for x, s in zip(got_leaves, want_leaves, strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
    # FSDP really splits: the embedding's shard on one device is a quarter of it (fsdp x tensor).
    embed = state.params["embed"]
    assert embed.addressable_shards[0].data.size * 4 == embed.size
