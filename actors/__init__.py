"""Ray actor roles: rollout (vLLM / HF generate), teacher scoring, student trainer (DeepSpeed)."""
