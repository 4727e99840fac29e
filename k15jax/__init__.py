"""k15jax: the Kimi k1.5 RL recipe in JAX."""
