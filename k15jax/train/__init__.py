"""The trainer: losses, the jitted train step, sequence packing, SFT and the memory preflight."""
