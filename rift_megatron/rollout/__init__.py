"""Rollout: the co-located vLLM engine, rewards, the rollout data loader and weight sync."""
