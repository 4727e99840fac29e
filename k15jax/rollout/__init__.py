"""Generation: rollout engines (vLLM in process, a fake), vLLM server pools, partial rollouts."""
