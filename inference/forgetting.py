"""Forgetting: temper a streaming posterior toward the base prior before the next update.

For exponential families this is a geometric mixture, posterior^lam * prior^(1-lam), which is
linear interpolation of natural parameters. Beta and Dirichlet concentrations are (shifted)
natural parameters, so MoPPS' and DPS' decay rules are this with `lam` = their decay. Applying
it `delta` times in a row is the same as applying it once with lam**delta, which lets a
predictor bring a prompt up to date lazily, only when it is next looked at.
"""

from __future__ import annotations

import torch
from torch import Tensor


def decay_concentration(concentration: Tensor, prior: Tensor | float, lam: float | Tensor,
                        delta: Tensor | int = 1) -> Tensor:
    """Beta/Dirichlet: c <- prior + lam**delta * (c - prior)."""
    factor = torch.as_tensor(lam, dtype=concentration.dtype) ** torch.as_tensor(delta, dtype=concentration.dtype)
    if factor.dim() < concentration.dim() and factor.dim() > 0:
        factor = factor.reshape(factor.shape + (1,) * (concentration.dim() - factor.dim()))
    return prior + factor * (concentration - prior)


def decay_gaussian(loc: Tensor, scale: Tensor, prior_loc: Tensor | float, prior_scale: Tensor | float,
                   lam: float | Tensor, delta: Tensor | int = 1) -> tuple[Tensor, Tensor]:
    """Normal: interpolate precision and precision-times-mean (the natural parameters)."""
    factor = torch.as_tensor(lam, dtype=loc.dtype) ** torch.as_tensor(delta, dtype=loc.dtype)
    prior_loc = torch.as_tensor(prior_loc, dtype=loc.dtype)
    prior_prec = torch.as_tensor(prior_scale, dtype=loc.dtype) ** -2
    prec = scale ** -2
    new_prec = factor * prec + (1 - factor) * prior_prec
    new_loc = (factor * prec * loc + (1 - factor) * prior_prec * prior_loc) / new_prec
    return new_loc, new_prec.rsqrt()
