"""The LM + GRPO environment: policy, rollout backends, tasks with verifiers, the tiny model."""
