"""Rewards and scoring: math equivalence, sandboxed code against tests, the length reward, the
judge, and the one scoring function that turns a response into reward and correctness."""
