"""The common RL loop, environments (simulated learner, LM + GRPO), acquisition rules, run I/O, CLI."""
