"""Attention and log-prob kernels behind one dispatch each (see `kernels.attention`)."""
