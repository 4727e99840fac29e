"""What every layer leans on: crash-safe file writes, multi-process JAX helpers, orbax
checkpoints."""
