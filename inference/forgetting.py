"""Forgetting: temper a streaming posterior toward the base prior before the next update.

One rule for every predictor, under one option name (`decay`, lam): after `delta` steps a piece
of evidence keeps weight lam**delta (`factor`). For exponential families this is the geometric
mixture posterior^w * prior^(1-w), which is linear interpolation of natural parameters: Beta and
Dirichlet concentrations (`decay_concentration`, MoPPS' and DPS' decay rules), Gaussian
precision and precision-times-mean (`decay_gaussian`), running sums of observations, and the
likelihood weight of an old outcome (the GP's replay buffer). Applying it `delta` times in a row
is the same as applying it once with lam**delta, which lets a predictor bring a prompt up to date
lazily, only when it is next looked at.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor


def factor(lam: float | Tensor, delta: Tensor | int | float = 1, dtype: torch.dtype | None = None,
           precision: torch.dtype = torch.float64) -> Tensor:
    """lam**delta, computed in `precision` (float64: long waits underflow cleanly to 0), returned in `dtype`."""
    out = torch.pow(torch.as_tensor(lam, dtype=precision), torch.as_tensor(delta, dtype=precision))
    return out if dtype is None else out.to(dtype)


def decay_concentration(concentration: Tensor, prior: Tensor | float, lam: float | Tensor,
                        delta: Tensor | int = 1) -> Tensor:
    """Beta/Dirichlet: c <- prior + lam**delta * (c - prior) (in the concentration's precision)."""
    if isinstance(lam, float) and isinstance(delta, int) and delta == 1:  # one step: lam itself, no tensor ops
        return prior + lam * (concentration - prior)  # (on a predictor's per-step path)
    weight = factor(lam, delta, concentration.dtype, precision=concentration.dtype)
    if 0 < weight.dim() < concentration.dim():
        weight = weight.reshape(weight.shape + (1,) * (concentration.dim() - weight.dim()))
    return prior + weight * (concentration - prior)


def decay_gaussian(loc: Tensor, scale: Tensor, prior_loc: Tensor | float, prior_scale: Tensor | float,
                   lam: float | Tensor, delta: Tensor | int = 1) -> tuple[Tensor, Tensor]:
    """Normal: interpolate precision and precision-times-mean (the natural parameters)."""
    weight = factor(lam, delta, loc.dtype, precision=loc.dtype)
    prior_loc = torch.as_tensor(prior_loc, dtype=loc.dtype)
    prior_prec = torch.as_tensor(prior_scale, dtype=loc.dtype) ** -2
    prec = scale ** -2
    new_prec = weight * prec + (1 - weight) * prior_prec
    new_loc = (weight * prec * loc + (1 - weight) * prior_prec * prior_loc) / new_prec
    return new_loc, new_prec.rsqrt()


def decay_option(parts: dict[str, float], what: str) -> Any:
    """The `decay` option of a predictor that forgets several things at their own rates: one
    number for all of them, or a mapping from part to rate (parts left out keep their default)."""
    names = ", ".join(f"{name} {rate:g}" for name, rate in parts.items())
    return Field(dict(parts), description=f"lam per step for {what}: one number for all, or per part ({names})")


def decay_rates(value: float | dict[str, float], parts: dict[str, float]) -> dict[str, float]:
    """Validated rates of every part from a `decay` option value (see `decay_option`)."""
    rates = {name: float(value) for name in parts} if isinstance(value, (int, float)) else {**parts, **value}
    unknown = sorted(set(rates) - set(parts))
    if unknown:
        raise ValueError(f"decay: unknown part {unknown[0]!r}; parts are {', '.join(parts)}")
    bad = [name for name, rate in rates.items() if not 0.0 <= rate <= 1.0]
    if bad:
        raise ValueError(f"decay: {bad[0]} must be in [0, 1], got {rates[bad[0]]}")
    return rates
