"""The run: its config, setup, state, the RL loop, evaluation, difficulty, report, long2short."""
