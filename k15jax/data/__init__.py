"""Prompts: prompt sets from files and the built-in tasks, answer forms, the curriculum sampler."""
