"""Losses against independent formulas: Eq. 3 gradients, finite differences, chunked log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15jax.train import losses

B, T, V, K = 8, 5, 6, 4  # 2 groups of K = 4 samples


def _policy_logp(theta_tv, y_bt):
    """A tabular softmax policy: one logit vector per position; returns [b, t] log-probs."""
    logp_tv = jax.nn.log_softmax(theta_tv, axis=-1)
    return logp_tv[jnp.arange(T)[None], y_bt]


def _explicit_eq3(theta, theta_ref, y, mask, r, tau):
    """-(1/B) Σ_j [(r_j - r̄) ∇logπ_j - τ δ_j ∇δ_j] with ∇ of a softmax written out by hand."""
    theta, theta_ref = np.asarray(theta, np.float64), np.asarray(theta_ref, np.float64)
    p = np.exp(theta - theta.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logp = np.log(p)
    pr = np.exp(theta_ref - theta_ref.max(-1, keepdims=True))
    logp_ref = np.log(pr / pr.sum(-1, keepdims=True))
    g = np.zeros_like(theta)
    rbar = np.repeat(r.reshape(-1, K).mean(1), K)
    for j in range(B):
        grad_logpi = np.zeros_like(theta)  # ∇ Σ_t mask log softmax(θ_t)[y_t] = Σ_t mask (e_y - p_t)
        delta = 0.0
        for t in range(T):
            if mask[j, t]:
                grad_logpi[t] -= p[t]
                grad_logpi[t, y[j, t]] += 1.0
                delta += logp[t, y[j, t]] - logp_ref[t, y[j, t]]
        g += (r[j] - rbar[j]) * grad_logpi - tau * delta * grad_logpi
    return -g / B


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    theta_ref = rng.normal(size=(T, V)).astype(np.float32)
    theta = theta_ref + 0.3 * rng.normal(size=(T, V)).astype(np.float32)
    y = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    r = rng.integers(0, 2, B).astype(np.float32)
    r[:K] = [1, 0, 0, 1]  # make sure group 0 has variance
    return theta, theta_ref, y, mask, r


def _loss(theta, theta_ref, y, mask, r, tau, **kw):
    logp = _policy_logp(theta, y)
    ref = _policy_logp(theta_ref, y)
    return losses.mirror_descent_loss(logp, ref, mask, r, group_size=K, tau=tau, **kw)[0]


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_gradient_equals_paper_eq3(problem, tau):
    theta, theta_ref, y, mask, r = problem
    got = jax.grad(_loss)(theta, theta_ref, y, mask, r, tau)
    want = _explicit_eq3(theta, theta_ref, y, mask, r, tau)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_at_reference_reduces_to_reinforce_with_mean_baseline(problem):
    _, theta_ref, y, mask, r = problem
    got = jax.grad(_loss)(theta_ref, theta_ref, y, mask, r, 0.5)
    # REINFORCE: -(1/B) Σ (r_j - r̄) ∇ logπ_j, via autodiff of a different surrogate.
    rbar = np.repeat(r.reshape(-1, K).mean(1), K)
    reinforce = lambda th: -jnp.mean((r - rbar) * jnp.sum(mask * _policy_logp(th, y), axis=1))
    np.testing.assert_allclose(got, jax.grad(reinforce)(theta_ref), rtol=1e-5, atol=1e-7)
    assert np.abs(got).max() > 1e-3


def test_finite_differences(problem):
    theta, theta_ref, y, mask, r = problem
    with jax.enable_x64(True):
        th = jnp.asarray(theta, jnp.float64)
        f = lambda t: _loss(t, jnp.asarray(theta_ref, jnp.float64), y, mask, r, 0.3)
        g = jax.grad(f)(th)
        rng = np.random.default_rng(1)
        for _ in range(3):
            d = jnp.asarray(rng.normal(size=th.shape))
            eps = 1e-5
            fd = (f(th + eps * d) - f(th - eps * d)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=1e-6)


def test_zero_variance_groups_only_get_the_tau_term(problem):
    theta, theta_ref, y, mask, _ = problem
    r = np.ones(B, np.float32)
    tau = 0.7
    got = jax.grad(_loss)(theta, theta_ref, y, mask, r, tau)
    want = _explicit_eq3(theta, theta_ref, y, mask, r, tau)  # advantage 0 -> only τ δ ∇δ
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    at_ref = jax.grad(_loss)(theta_ref, theta_ref, y, mask, r, tau)
    np.testing.assert_allclose(at_ref, 0.0, atol=1e-7)
    logp, ref = _policy_logp(theta, y), _policy_logp(theta_ref, y)
    _, m = losses.mirror_descent_loss(logp, ref, mask, r, group_size=K, tau=tau)
    assert float(m["zero_variance_groups"]) == 1.0


def test_loss_value_and_metrics(problem):
    theta, theta_ref, y, mask, r = problem
    logp, ref = _policy_logp(theta, y), _policy_logp(theta_ref, y)
    loss, m = losses.mirror_descent_loss(logp, ref, mask, r, group_size=K, tau=0.2)
    delta = np.sum(mask * (np.asarray(logp) - np.asarray(ref)), axis=1)
    adv = r - np.repeat(r.reshape(-1, K).mean(1), K)
    np.testing.assert_allclose(loss, np.mean((adv - 0.2 * delta) ** 2) / 0.4, rtol=1e-5)
    np.testing.assert_allclose(m["delta_abs_mean"], np.abs(delta).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["advantage_abs_mean"], np.abs(adv).mean(), rtol=1e-6)
    zero_var = np.mean([len(set(g)) == 1 for g in r.reshape(-1, K)])
    assert float(m["zero_variance_groups"]) == zero_var
    # The length-normalized variant is an explicit option and differs.
    n = np.maximum(mask.sum(1), 1)
    normed = losses.mirror_descent_loss(
        logp, ref, mask, r, group_size=K, tau=0.2, normalize_by_length=True
    )[0]
    np.testing.assert_allclose(normed, np.mean((adv - 0.2 * delta) ** 2 / 0.4 / n), rtol=1e-5)


def test_ref_logp_gets_no_gradient(problem):
    theta, theta_ref, y, mask, r = problem
    g_ref = jax.grad(_loss, argnums=1)(theta, theta_ref, y, mask, r, 0.3)
    np.testing.assert_array_equal(g_ref, 0.0)


# ------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_token_logprobs_equal_full(chunk):
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 23, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (2, 23)))
    full = jax.nn.log_softmax(jnp.einsum("bte,ev->btv", h, w), -1)
    want = jnp.pad(jnp.take_along_axis(full[:, :-1], y[:, 1:, None], -1)[..., 0], ((0, 0), (1, 0)))
    got = losses.token_logprobs(h, w, y, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    wt = jnp.asarray(rng.normal(size=(2, 23)), jnp.float32)
    f = lambda c: lambda h, w: jnp.sum(wt * losses.token_logprobs(h, w, y, chunk_size=c))
    g_chunk = jax.grad(f(chunk), argnums=(0, 1))(h, w)
    g_full = jax.grad(f(None), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_logprob_memory_is_10x_lower_at_32k():
    t, e, v = 32768, 64, 152064
    h = jax.ShapeDtypeStruct((1, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v), jnp.float32)
    y = jax.ShapeDtypeStruct((1, t), jnp.int32)
    ref = jax.ShapeDtypeStruct((1, t), jnp.float32)

    def temp_bytes(chunk):
        def loss(h, w, y, ref):
            logp = losses.token_logprobs(h, w, y, chunk_size=chunk)
            return losses.mirror_descent_loss(
                logp, ref, jnp.ones_like(ref), jnp.ones((1,)), group_size=1, tau=0.1
            )[0]

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, y, ref).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(None), temp_bytes(1024)
    print(
        f"\nlog-prob+loss+grad temp memory at t={t}, vocab={v}: "
        f"full {full / 2**30:.2f} GiB, chunked {chunked / 2**30:.3f} GiB, "
        f"ratio {full / chunked:.1f}x"
    )
    assert full >= t * v * 4  # the full version really holds [t, vocab] float32 logits
    assert chunked * 10 <= full


# --------------------------------------------------------------------------- SFT and DPO


def test_sft_loss_is_masked_token_mean():
    logp = jnp.array([[0.0, -1.0, -2.0], [0.0, -3.0, -4.0]])
    mask = jnp.array([[0, 1, 1], [0, 1, 0]])
    loss, m = losses.sft_loss(logp, mask)
    np.testing.assert_allclose(loss, (1 + 2 + 3) / 3)
    assert float(m["tokens"]) == 3


def test_dpo_loss_matches_formula():
    c, r = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    rc, rr = jnp.array([-1.5, -2.0]), jnp.array([-2.5, -1.5])
    loss, m = losses.dpo_loss(c, r, rc, rr, beta=0.5)
    margin = 0.5 * ((np.array(c) - rc) - (np.array(r) - rr))
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-6)
    assert float(m["accuracy"]) == np.mean(margin > 0)


def test_invalid_rows_do_not_count(problem):
    theta, theta_ref, y, mask, r = problem
    logp, ref = _policy_logp(theta, y), _policy_logp(theta_ref, y)
    # The first group alone equals the first group plus an invalid (padding) second group.
    alone = losses.mirror_descent_loss(logp[:K], ref[:K], mask[:K], r[:K], group_size=K, tau=0.3)
    valid = np.array([1.0] * K + [0.0] * K)
    padded = losses.mirror_descent_loss(logp, ref, mask, r, group_size=K, tau=0.3, valid_b=valid)
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-6)
    for k in alone[1]:
        np.testing.assert_allclose(padded[1][k], alone[1][k], rtol=1e-6, err_msg=k)
