"""Streaming variational inference, forgetting rules, scoring rules and calibration metrics."""

from .forgetting import decay_concentration, decay_gaussian
from .streaming import StreamingSVI, SVIState, WithModule

__all__ = ["SVIState", "StreamingSVI", "WithModule", "decay_concentration", "decay_gaussian"]
from .scoring import (auroc, brier_score, expected_calibration_error, log_predictive_density, observed_state, pit_coverage, reliability_table, score_trace, scores_by_window, spearman, state_confusion, truth_coverage)
