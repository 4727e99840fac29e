"""What every layer leans on: crash-safe file writes, multi-process JAX helpers, orbax
checkpoints, the log levels of a run's process."""
