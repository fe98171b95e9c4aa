"""Risk predictors: probabilistic models of each prompt's success rate under the policy."""

from .base import PredictorOptions, PromptPool, RiskPredictor, Rows, SuccessPosterior
from .model_predictor import Batch, ModelOptions, ModelPredictor
from .posteriors import BetaPosterior, LogitNormalPosterior, PointMassPosterior
from .registry import get_predictor_class, predictor_names, register_predictor

__all__ = [
    "Batch", "BetaPosterior", "LogitNormalPosterior", "ModelOptions", "ModelPredictor", "PointMassPosterior",
    "PredictorOptions", "PromptPool", "RiskPredictor", "Rows", "SuccessPosterior", "get_predictor_class", "predictor_names", "register_predictor",
]
