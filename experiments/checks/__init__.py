"""Checks of a machine or a claim: the GPU check, the multi-host check, the math-reward attacks."""
