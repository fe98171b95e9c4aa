"""Environments the common loop drives: the simulated learner (`simulator`) and the LM + GRPO
environment (`lm`). The seam itself is in `base`."""

from .base import ENVIRONMENTS, Environment, EnvironmentOptions, Outcomes, get_environment_class, register_environment

__all__ = ["ENVIRONMENTS", "Environment", "EnvironmentOptions", "Outcomes", "get_environment_class",
           "register_environment"]
