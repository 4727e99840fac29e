"""Reward functions (math, code, length)."""
