"""Long2short: merging, shortest rejection, DPO pairs, the DPO objective and the RL preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k15jax.model import convert, decoder, sharding, tokenizer
from k15jax.model.config import ModelConfig
from k15jax.run import long2short, run_config
from k15jax.train import losses, train_step

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attention_bias=True,
)
# Momentum SGD is linear in the gradient: sharded and single-device steps agree to float32
# reduction noise (the reason is spelled out in test_train_step.py).
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
S = long2short.Scored


# ----------------------------------------------------------------------------- merging


def test_merging_identical_checkpoints_is_the_identity():
    params = decoder.init(CFG, jax.random.key(0))
    merged = long2short.merge_params(params, params, weight_a=0.3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), merged, params)


def test_merging_two_checkpoints_gives_their_weighted_mean():
    a, b = decoder.init(CFG, jax.random.key(0)), decoder.init(CFG, jax.random.key(1))
    merged = long2short.merge_params(a, b, weight_a=0.25)
    want = jax.tree.map(lambda x, y: 0.25 * np.asarray(x) + 0.75 * np.asarray(y), a, b)
    jax.tree.map(lambda m, w: np.testing.assert_allclose(m, w, rtol=1e-6, atol=1e-7), merged, want)
    half = long2short.merge_params(a, b)  # default: equal weights
    np.testing.assert_allclose(half["embed"], (np.asarray(a["embed"]) + b["embed"]) / 2, rtol=1e-6)


def test_merge_refuses_other_shapes_naming_the_first_tensor():
    a = decoder.init(CFG, jax.random.key(0))
    wider = dataclasses.replace(CFG, intermediate_size=48)
    b = decoder.init(wider, jax.random.key(0))
    with pytest.raises(long2short.MergeError, match=r"\['layers'\]\[0\]\['mlp'\]"):
        long2short.check_mergeable(CFG, a, wider, b)
    other = dataclasses.replace(CFG, rope_theta=CFG.rope_theta * 2)  # same shapes
    with pytest.raises(long2short.MergeError, match="rope_theta"):
        long2short.check_mergeable(CFG, a, other, a)


def test_merge_checkpoints_writes_the_mean_of_two_directories(tmp_path):
    cfg = dataclasses.replace(CFG, vocab_size=tokenizer.builtin().vocab_size)
    a, b = decoder.init(cfg, jax.random.key(0)), decoder.init(cfg, jax.random.key(1))
    tok = tokenizer.builtin()
    da = convert.save_hf(cfg, a, str(tmp_path / "a"), tokenizer=tok)
    db = convert.save_hf(cfg, b, str(tmp_path / "b"), tokenizer=tok)
    out = long2short.merge_checkpoints(da, db, str(tmp_path / "m"), weight_a=0.5)
    _, merged = convert.load_hf(out)
    want = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / 2, a, b)
    jax.tree.map(lambda m, w: np.testing.assert_allclose(m, w, rtol=1e-6, atol=1e-7), merged, want)
    wide = dataclasses.replace(cfg, intermediate_size=48)
    dw = convert.save_hf(wide, decoder.init(wide, jax.random.key(0)), str(tmp_path / "w"))
    with pytest.raises(long2short.MergeError, match="mlp"):
        long2short.merge_checkpoints(da, dw, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- shortest rejection and pairs

GROUPS = [
    # prompt 0: correct of 4, 2 (first of the shortest), 2, 7 tokens; one wrong of 3
    [S(0, (1, 2, 3, 4), True), S(0, (5, 6), True), S(0, (7, 8), True), S(0, (9,) * 3, False),
     S(0, (1,) * 7, True)],
    [S(1, (1,), False), S(1, (2, 3), False)],  # prompt 1: nothing correct
    [S(2, (4, 4, 4), True)],  # prompt 2: one correct, nothing to reject
]  # fmt: skip


def test_shortest_rejection_picks_the_shortest_correct_and_skips_prompts_without_one():
    chosen, skipped = long2short.shortest_correct(GROUPS)
    assert chosen == [GROUPS[0][1], GROUPS[2][0]] and chosen[0] is GROUPS[0][1]
    assert skipped == 1


def test_pairs_are_exactly_the_wrong_and_the_long_correct():
    pairs = long2short.preference_pairs(GROUPS, long2short.PairRules())
    chosen = (5, 6)
    # Rejected: the wrong one, and the correct ones >= 1.5 * 2 = 3 tokens (4 and 7 tokens);
    # the other 2-token correct one is not.
    assert pairs == [
        long2short.Pair(0, chosen, (1, 2, 3, 4)),
        long2short.Pair(0, chosen, (9, 9, 9)),
        long2short.Pair(0, chosen, (1,) * 7),
    ]
    only_wrong = long2short.preference_pairs(GROUPS, long2short.PairRules(length_ratio=0))
    assert only_wrong == [long2short.Pair(0, chosen, (9, 9, 9))]
    only_long = long2short.preference_pairs(
        GROUPS, long2short.PairRules(wrong="none", length_ratio=3.5)
    )
    assert only_long == [long2short.Pair(0, chosen, (1,) * 7)]
    with pytest.raises(ValueError, match="length_ratio=0.5"):
        long2short.PairRules(length_ratio=0.5)


def test_a_wrong_response_not_longer_than_the_chosen_is_no_negative_by_default():
    # k1.5 §2.4: negatives are the *longer* wrong responses. Chosen: the 3-token correct one;
    # the wrong ones have 1 (shorter), 3 (as long) and 4 tokens (longer).
    group = [S(0, (1, 2, 3), True), S(0, (4,), False), S(0, (5, 6, 7), False),
             S(0, (8,) * 4, False)]  # fmt: skip
    chosen = (1, 2, 3)
    paper = long2short.preference_pairs([group], long2short.PairRules())
    assert paper == [long2short.Pair(0, chosen, (8, 8, 8, 8))]
    every = long2short.preference_pairs([group], long2short.PairRules(wrong="all"))
    assert every == [long2short.Pair(0, chosen, s.token_ids) for s in group[1:]]
    assert long2short.preference_pairs([group], long2short.PairRules(wrong="none")) == []
    with pytest.raises(ValueError, match="wrong='shorter'"):
        long2short.PairRules(wrong="shorter")


def test_pair_rows_put_chosen_then_rejected_with_response_masks():
    pairs = [long2short.Pair(1, (7, 8), (9,)), long2short.Pair(0, (5,), (6, 6, 6))]
    tokens, mask, seg = long2short.pair_rows(pairs, [[1, 2], [3]], seq_len=5)
    np.testing.assert_array_equal(
        tokens, [[3, 7, 8, 0, 0], [3, 9, 0, 0, 0], [1, 2, 5, 0, 0], [1, 2, 6, 6, 6]]
    )
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 1]])  # fmt: skip
    np.testing.assert_array_equal(seg, tokens > 0)


# --------------------------------------------------------------------------------- DPO


def test_dpo_loss_gradient_matches_its_closed_form():
    c, r = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-3.0, -1.0, -0.7])
    rc, rr = jnp.array([-1.5, -2.0, -0.4]), jnp.array([-2.5, -1.5, -0.9])
    valid = jnp.array([1.0, 1.0, 0.0])
    beta = 0.5
    f = lambda c, r: losses.dpo_loss(c, r, rc, rr, beta=beta, valid_b=valid)[0]
    gc, gr = jax.grad(f, argnums=(0, 1))(c, r)
    margin = beta * ((np.array(c) - rc) - (np.array(r) - rr))
    # d/dc -log σ(m) = -β σ(-m), averaged over the 2 valid pairs; d/dr is its negative.
    want = -beta / (1 + np.exp(margin)) * np.array(valid) / 2
    np.testing.assert_allclose(gc, want, rtol=1e-5)
    np.testing.assert_allclose(gr, -want, rtol=1e-5)


def _pair_batch(seed=0, pairs=8, t=12):
    rng = np.random.default_rng(seed)
    b = 2 * pairs
    tokens = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
    lengths = rng.integers(6, t + 1, b)
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    mask = (seg * (np.arange(t)[None] >= 4)).astype(np.float32)
    return tokens, mask, seg


def _seq_logp(params, tokens, mask, seg):
    logp = train_step.sequence_logprobs(CFG, params, tokens, seg)
    return np.asarray(jnp.sum(logp * mask, axis=1))


def _dpo_run(mesh_shape, devices, *, micro=1, steps=2):
    mesh = sharding.make_mesh(mesh_shape, devices)
    params = decoder.init(CFG, jax.random.key(0))
    step_cfg = train_step.StepConfig(objective="dpo", group_size=2, beta=0.5, micro_batches=micro)
    step = train_step.make_train_step(CFG, OPT, step_cfg, mesh)
    state = train_step.init_state(params, CFG, OPT, mesh)
    tokens, mask, seg = _pair_batch()
    # The reference: the starting model, perturbed per row so the margins are not all zero.
    ref = np.asarray(train_step.sequence_logprobs(CFG, params, tokens, seg))
    ref = ref + np.random.default_rng(1).normal(0, 0.05, ref.shape).astype(np.float32)
    batch = train_step.Batch(
        tokens_bt=tokens,
        mask_bt=mask,
        ref_logp_bt=ref,
        reward_b=np.zeros(len(tokens), np.float32),
        segment_ids_bt=seg,
        valid_b=np.ones(len(tokens), np.float32),
    )
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, jax.device_get(state.params), (tokens, mask, seg, ref)


@pytest.fixture(scope="module")
def single_dpo_run():
    return _dpo_run((1, 1, 1), jax.devices()[:1])


def test_dpo_step_raises_chosen_and_lowers_rejected_against_the_reference(single_dpo_run):
    metrics, params, (tokens, mask, seg, ref) = single_dpo_run
    ref_seq = (ref * mask).sum(axis=1)
    start = decoder.init(CFG, jax.random.key(0))
    before = _seq_logp(start, tokens, mask, seg) - ref_seq
    after = _seq_logp(params, tokens, mask, seg) - ref_seq
    # Chosen rows (even) gain log-prob relative to the reference, rejected rows (odd) lose it,
    # in every pair, and the loss falls.
    assert np.all(after[0::2] > before[0::2]), (before, after)
    assert np.all(after[1::2] < before[1::2]), (before, after)
    assert metrics[1]["loss"] < metrics[0]["loss"]
    # The step's loss is the DPO loss of the sequence log-probs (an independent computation).
    margin = 0.5 * (before[0::2] - before[1::2])
    np.testing.assert_allclose(metrics[0]["loss"], np.mean(np.log1p(np.exp(-margin))), rtol=1e-4)
    np.testing.assert_allclose(metrics[0]["margin_mean"], margin.mean(), rtol=1e-4, atol=1e-6)
    assert metrics[0]["accuracy"] == np.mean(margin > 0)


def test_sharded_dpo_step_equals_single_device(single_dpo_run):
    # All three mesh axes and two micro-batches (one mesh: each costs a compile of the step).
    assert len(jax.devices()) == 8
    want_m, want_params, _ = single_dpo_run
    got_m, got_params, _ = _dpo_run((2, 2, 2), jax.devices(), micro=2)
    for key in ("loss", "margin_mean", "accuracy"):
        # atol: the first step's mean margin is ~1e-3 (the reference is the start model plus
        # noise), where float32 reduction-order noise (~2e-7) exceeds rtol alone.
        got, want = [m[key] for m in got_m], [m[key] for m in want_m]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_params, want_params
    )


def test_dpo_objective_needs_pairs():
    with pytest.raises(ValueError, match="group_size=4 must be 2"):
        train_step.StepConfig(objective="dpo", group_size=4)
    with pytest.raises(ValueError, match="must be even"):
        losses.dpo_pair_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.ones((3, 2)), beta=0.1)


# ------------------------------------------------------------------------ long2short RL


def test_rl_preset_strengthens_the_length_reward_and_cuts_the_length():
    base = run_config.RunConfig()
    cfg = long2short.rl_preset(base)
    preset = long2short.RlPreset()
    assert cfg.length.weight == preset.length_weight > base.length.weight
    assert cfg.length.warmup_iterations == 0
    # 3x: the preset's 64 tokens against the default run's 192 (its docstring)
    assert cfg.partial.max_length == preset.max_length <= base.partial.max_length / 3
    assert cfg.partial.budget <= cfg.partial.max_length
    assert dataclasses.replace(cfg, length=base.length, partial=base.partial) == base


def test_efficiency_rows_and_table():
    results = {
        "long": {"pass_at_1": 0.5, "ci95": [0.4, 0.6], "mean_length": 100.0},
        "short": {"pass_at_1": 0.3, "ci95": [0.2, 0.4], "mean_length": 60.0},
    }
    rows = long2short.efficiency_rows(results)
    assert [r["model"] for r in rows] == ["long", "short"]
    assert rows[1]["length_change"] == pytest.approx(-0.4)
    table = long2short.markdown(rows, header="## x")
    assert "| short | 0.300 [0.200, 0.400] | 60.0 | -40% |" in table


# ------------------------------------------------- a run's setup: sampling, SFT set, DPO run


@pytest.fixture(scope="module")
def small_setup():
    from k15jax.data import prompt_sets
    from k15jax.rollout import partial
    from k15jax.run import evaluation, run_setup

    base = run_config.RunConfig()
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model, hidden_size=32, intermediate_size=64, head_dim=8, num_hidden_layers=1
        ),
        task=prompt_sets.TaskConfig(train_problems=6, sft_examples=0),
        partial=partial.PartialConfig(budget=16, max_length=16),
        eval=evaluation.EvalConfig(problems=2),
    )
    return run_setup.prepare(cfg)


@dataclasses.dataclass
class ScriptedEngine:
    """Returns fixed (text, finish reason) completions for every prompt, in order."""

    encode: object
    script: list

    def generate(self, prompts, spec, *, max_tokens=None, seeds=None):
        from k15jax.rollout import engines

        assert spec.n == len(self.script)
        return [
            engines.Completion(i, self.encode(text), [0.0] * len(self.encode(text)), reason)
            for i in range(len(prompts))
            for text, reason in self.script
        ]


def test_sample_scores_with_the_run_scorer_and_writes_the_shortest(small_setup, tmp_path):
    import json

    setup = small_setup
    problems = setup.problems.train[:3]
    right = lambda p: f"answer: {p.answer}"  # noqa: E731
    # Every prompt gets: a long correct answer, a correct one cut at the length limit (never
    # correct), a wrong one. Texts use each prompt's own answer via a per-prompt engine call.
    groups = []
    for p in problems:
        engine = ScriptedEngine(
            setup.tok.encode,
            [(f"plan: add\n{right(p)}", "stop"), (right(p), "length"), ("answer: -1", "stop")],
        )
        groups += long2short.sample(setup, engine, [p], n=3, max_tokens=16, temperature=1.0, seed=0)
    assert [[s.correct for s in g] for g in groups] == [[True, False, False]] * 3
    chosen, skipped = long2short.shortest_correct(groups)
    assert skipped == 0 and [len(s.token_ids) for s in chosen] == [
        len(setup.tok.encode(f"plan: add\n{right(p)}")) for p in problems
    ]
    chosen = [dataclasses.replace(s, prompt_index=i) for i, s in enumerate(chosen)]
    traces = long2short.sft_traces(setup, problems, chosen)
    assert traces == tuple((p.prompt, f"plan: add\n{right(p)}") for p in problems)
    path = long2short.write_sft_jsonl(str(tmp_path / "sft.jsonl"), problems, chosen, traces)
    rows = [json.loads(line) for line in open(path)]
    assert [r["response"] for r in rows] == [t[1] for t in traces]
    assert [r["id"] for r in rows] == [p.id for p in problems]


def test_train_dpo_raises_the_chosen_over_the_rejected(small_setup):
    setup = small_setup
    enc, eos = setup.tok.encode, setup.tok.eos_id
    pairs = [
        long2short.Pair(i, tuple(enc(f"answer: {p.answer}") + [eos]),
                        tuple(enc("plan: add 2 numbers") + [eos]))
        for i, p in enumerate(setup.problems.train[:4])
    ]  # fmt: skip
    cfg = long2short.DpoConfig(steps=2, pairs_per_step=4, learning_rate=3e-3, beta=0.5)
    params = jax.device_get(setup.params)
    new, history = long2short.train_dpo(setup, params, pairs, cfg, seed=0)
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"]
    prompts = [setup.prompt_ids(p) for p in setup.problems.train]
    tokens, mask, seg = long2short.pair_rows(pairs, prompts, seq_len=setup.cfg.seq_len)
    seq = lambda p: np.asarray(  # noqa: E731
        (train_step.sequence_logprobs(setup.model_cfg, p, tokens, seg) * mask).sum(axis=1)
    )
    before, after = seq(params), seq(new)
    assert np.all((after - before)[0::2] > (after - before)[1::2])  # margin grows in each pair


def test_long2short_flags_reach_the_configs():
    from absl import flags

    from experiments import long2short as script
    from experiments import run_flags

    f = flags.FLAGS
    f.unparse_flags()
    f(["prog", "--out_dir=/x", "--l2s_max_length=48", "--l2s_length_weight=0.7",
       "--l2s_iterations=3", "--short_max_length=24", "--short_sft_steps=7",
       "--dpo_length_ratio=2", "--dpo_wrong=none", "--dpo_beta=0.2"])  # fmt: skip
    try:
        cfg = run_flags.make_config()
        rl_cfg = script.rl_config(cfg)
        assert rl_cfg.out_dir == "/x/rl" and rl_cfg.rl.iterations == 3
        assert (rl_cfg.partial.max_length, rl_cfg.length.weight) == (48, 0.7)
        short = script.short_config(cfg)
        assert short.task.short_fraction == 1.0 and short.sft.steps == 7
        assert short.partial.max_length == 24 and short.out_dir == "/x/short"
        assert script.pair_rules() == long2short.PairRules(wrong="none", length_ratio=2)
        assert script.dpo_config().beta == 0.2
    finally:
        f.unparse_flags()
        f(["prog"])
