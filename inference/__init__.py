"""Streaming variational inference, forgetting rules, scoring rules and calibration metrics."""

from .forgetting import decay_concentration, decay_gaussian
from .streaming import StreamingSVI

__all__ = ["StreamingSVI", "decay_concentration", "decay_gaussian"]
