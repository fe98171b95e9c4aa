"""Predictive distributions of a success count as Pyro distributions, and their one quadrature.

- Beta-Binomial: Pyro's own `dist.BetaBinomial` (closed form).
- `BinomialLogitNormal`: S ~ Binomial(n, sigmoid(f)), f ~ Normal(loc, scale) integrated out.
- `ThreeStateCount`: a belief over the states unsolved (p = 0) / partial (p ~ Beta) / solved
  (p = 1), S ~ Binomial(n, p) (the HMM predictor's predictive).

Each is a `TorchDistribution`: usable as a likelihood in a Pyro model (`pyro.sample(...,
obs=s)`) and as a posterior predictive (`log_prob`, `sample`). `binomial_logit_normal` is the
only numerical integral in the package: every LogitNormal quantity (predictive pmf, mean and
variance of p, the posterior moments of f that id_vae's filter needs) goes through it.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.ops.special import log_beta, log_binomial
from torch import Tensor

_DROP = 36.0  # the integration range ends where the integrand is e^-36 of its peak
# the range search (`_integration_range`): Newton passes until the peak is known to within
# _PEAK_SLACK (log units) and each end moves by less than _END_SLACK of the width (at most _MAX_STEPS)
_PEAK_SLACK, _END_SLACK, _MAX_STEPS = 0.5, 0.01, 100
_MIN_NODES, _MAX_NODES = 64, 1024
_NODE_SPACING = 0.5  # logit units: sigmoid's poles sit pi off the real axis, so the trapezoid rule
# converges like exp(-2 pi^2 / spacing) (below 1e-15 relative here)

__all__ = ["BinomialLogitNormal", "ThreeStateCount", "beta_binomial_log_prob", "binomial_logit_normal",
           "log_beta", "log_binomial"]


def beta_binomial_log_prob(alpha: Tensor, beta: Tensor, successes: Tensor, trials: Tensor) -> Tensor:
    """log BetaBinomial(s; n, alpha, beta) (Pyro's distribution, without argument validation)."""
    return dist.BetaBinomial(alpha, beta, trials, validate_args=False).log_prob(successes)


def _log_likelihood(f: Tensor, s: Tensor, n: Tensor) -> Tensor:
    """s log sigmoid(f) + (n - s) log sigmoid(-f), with one exp and one log1p per element. Plain
    elementwise ops: torch's CPU `logsigmoid` kernel splits even a few hundred elements across
    threads, and each pass of the range search then waits on every thread."""
    return s * f.clamp(max=0.0) - (n - s) * f.clamp(min=0.0) - n * torch.log1p(torch.exp(-f.abs()))


def _range_terms(f: Tensor, loc: Tensor, kappa: Tensor, s: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The log integrand up to a constant, its slope and its curvature's magnitude at f
    (kappa = 1 / scale^2): the range search below is a few such passes."""
    p = torch.sigmoid(f)
    value = -0.5 * kappa * (f - loc).square() + _log_likelihood(f, s, n)
    return value, (loc - f) * kappa + s - n * p, kappa + n * p * (1.0 - p)


def _integration_range(loc: Tensor, scale: Tensor, s: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi] holding all but ~e^-36 of the mass of N(f; loc, scale) Binomial(s | n, sigmoid(f)).

    The log integrand g is concave with curvature >= kappa = 1/scale^2, and its mode lies in
    [loc - (n - s) scale^2 - 1, loc + s scale^2 + 1] (the likelihood's slope is bounded by n).
    First an approximate mode m, by Newton's method on g' (bisecting where a step would leave
    that bracket). Strong concavity bounds what m may miss from g'(m) alone: the true peak is at
    most g'(m)^2 / (2 kappa) above g(m) and at most abs(g'(m)) / kappa away, so points that much
    further than sqrt(2 (_DROP + that)) scale from m lie below g(m) - _DROP, outside the range on
    either side. From those points, Newton's method on g - (g(m) - _DROP): on a concave function
    each tangent's root stays outside, so every iterate encloses the mass, and a few make it tight.
    Typically ~10 vectorised passes in all (bisection took ~100), which matters because a batch's
    likelihood calls this at every SVI step.
    """
    var = scale.square()
    kappa = var.reciprocal()
    low, high = loc - (n - s) * var - 1.0, loc + s * var + 1.0
    mode = loc
    for _ in range(_MAX_STEPS):
        peak, slope, curvature = _range_terms(mode, loc, kappa, s, n)
        if not bool((0.5 * slope.square() * var > _PEAK_SLACK).any()):  # each peak known to 0.5 (NaN: given up)
            break
        rising = slope > 0
        low, high = torch.where(rising, mode, low), torch.where(rising, high, mode)
        step = mode + slope / curvature
        mode = torch.where((step > low) & (step < high), step, 0.5 * (low + high))
    missed = 0.5 * slope.square() * var  # the true peak is at most this much higher than `peak`
    reach = (2.0 * (_DROP + missed)).sqrt() * scale + slope.abs() * var
    ends = torch.stack([mode - reach, mode + reach])
    for _ in range(_MAX_STEPS):
        value, slope, _ = _range_terms(ends, loc, kappa, s, n)
        move = (value - (peak - _DROP)) / slope
        ends = ends - move
        if not bool((move.abs() > _END_SLACK * (ends[1] - ends[0])).any()):  # within 1% of tight
            break
    return ends[0], ends[1]


def binomial_logit_normal(loc: Tensor, scale: Tensor, successes: Tensor, trials: Tensor,
                          moments: bool = False) -> tuple[Tensor, ...]:
    """log P(S = s) for S ~ Binomial(n, sigmoid(f)), f ~ Normal(loc, scale), elementwise.

    With `moments`, also E[f | s] and Var[f | s]. Trapezoid rule on a grid that spans where the
    integrand lives (found per element by Newton's method on the concave log integrand), so wide
    priors and peaked likelihoods are both resolved; exact to ~1e-9 against adaptive numerical
    integration (tests). Differentiable in loc and scale: the grid is held fixed, the integrand
    is not. Computed in float64, returned in loc's dtype.
    """
    dtype = loc.dtype
    loc, scale, s, n = torch.broadcast_tensors(loc.double(), scale.double(), successes.double(), trials.double())
    with torch.no_grad():
        lo, hi = _integration_range(loc, scale, s, n)
        widest = float((hi - lo).max()) if lo.numel() else 0.0
        count = int(min(max(_MIN_NODES, math.ceil(widest / _NODE_SPACING) + 1), _MAX_NODES))
        fractions = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
        nodes = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * fractions  # [..., Q]
        step = (hi - lo) / (count - 1)
        log_weights = torch.zeros(count, dtype=torch.float64)
        log_weights[0] = log_weights[-1] = -math.log(2.0)  # trapezoid end points
        fixed = _log_likelihood(nodes, s.unsqueeze(-1), n.unsqueeze(-1)) + log_weights  # no loc or scale in it
    loc_, scale_ = loc.unsqueeze(-1), scale.unsqueeze(-1)
    terms = -0.5 * ((nodes - loc_) / scale_).square() - scale_.log() - 0.5 * math.log(2 * math.pi) + fixed
    log_marginal = torch.logsumexp(terms, -1) + step.log() + log_binomial(n, s)
    if not moments:
        return (log_marginal.to(dtype),)
    weights = torch.softmax(terms, -1)
    mean = (weights * nodes).sum(-1)
    variance = (weights * (nodes - mean.unsqueeze(-1)).square()).sum(-1)
    return log_marginal.to(dtype), mean.to(dtype), variance.to(dtype)


class BinomialLogitNormal(dist.TorchDistribution):
    """S ~ Binomial(total_count, sigmoid(f)) with f ~ Normal(loc, scale) integrated out."""

    arg_constraints = {"total_count": constraints.nonnegative_integer, "loc": constraints.real,
                       "scale": constraints.positive}
    has_enumerate_support = False

    def __init__(self, total_count: Tensor | float, loc: Tensor, scale: Tensor, validate_args=None):
        self.total_count, self.loc, self.scale = torch.broadcast_tensors(
            torch.as_tensor(total_count, dtype=torch.as_tensor(loc).dtype), torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.total_count)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return BinomialLogitNormal(self.total_count.expand(shape), self.loc.expand(shape), self.scale.expand(shape),
                                   validate_args=self._validate_args)

    def _rate_moment(self, power: int) -> Tensor:
        """E[p**power] = P(S = power | power trials): the same quadrature as `log_prob`."""
        count = torch.full_like(self.loc, float(power))
        return binomial_logit_normal(self.loc, self.scale, count, count)[0].exp()

    @property
    def mean(self) -> Tensor:
        return self.total_count * self._rate_moment(1)

    @property
    def variance(self) -> Tensor:
        """Var S = n E[p] + n (n - 1) E[p^2] - (n E[p])^2 (binomial factorial moments)."""
        n, first = self.total_count, self._rate_moment(1)
        return (n * first + n * (n - 1) * self._rate_moment(2) - (n * first).square()).clamp_min(0.0)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            logits = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(shape, dtype=self.loc.dtype)
            return torch.distributions.Binomial(self.total_count.expand(shape), logits=logits).sample()

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return binomial_logit_normal(self.loc, self.scale, value, self.total_count)[0]


class ThreeStateCount(dist.TorchDistribution):
    """S ~ Binomial(n, p) with p from a belief over three states: unsolved (p = 0, probability w0),
    partial (p ~ Beta(a, b), w1) and solved (p = 1, w2). So P(S = s) = w0 [s = 0] + w2 [s = n]
    + w1 BetaBinomial(s; n, a, b): a binomial mixture, whose mixing distribution of p is what
    `ThreeStateMixturePosterior` summarises and samples.

    state_probs [..., 3]; a, b and total_count broadcast against its batch shape.
    """

    arg_constraints = {"state_probs": constraints.simplex, "a": constraints.positive, "b": constraints.positive,
                       "total_count": constraints.nonnegative_integer}

    def __init__(self, state_probs: Tensor, a: Tensor | float, b: Tensor | float, total_count: Tensor | float,
                 validate_args=None):
        batch_shape = state_probs.shape[:-1]
        as_batch = lambda x: torch.as_tensor(x, dtype=state_probs.dtype).expand(batch_shape)  # noqa: E731
        self.state_probs = state_probs
        self.a, self.b, self.total_count = as_batch(a), as_batch(b), as_batch(total_count)
        super().__init__(batch_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.total_count)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return ThreeStateCount(self.state_probs.expand(shape + (3,)), self.a.expand(shape), self.b.expand(shape),
                               self.total_count.expand(shape), validate_args=self._validate_args)

    def _pmf_table(self) -> Tensor:
        """P(S = s) for s = 0..max(n), [max(n) + 1, *batch] (zero beyond each n): `log_prob` itself."""
        top = int(self.total_count.max()) if self.total_count.numel() else 0
        counts = torch.arange(top + 1, dtype=self.state_probs.dtype).reshape((-1,) + (1,) * len(self.batch_shape))
        return self.log_prob(counts.expand((top + 1,) + self.batch_shape)).exp()  # -inf beyond n: zero

    @property
    def mean(self) -> Tensor:
        pmf = self._pmf_table()
        counts = torch.arange(pmf.shape[0], dtype=pmf.dtype).reshape((-1,) + (1,) * len(self.batch_shape))
        return (pmf * counts).sum(0)

    @property
    def variance(self) -> Tensor:
        pmf = self._pmf_table()
        counts = torch.arange(pmf.shape[0], dtype=pmf.dtype).reshape((-1,) + (1,) * len(self.batch_shape))
        mean = (pmf * counts).sum(0)
        return (pmf * (counts - mean).square()).sum(0)

    def log_prob(self, value: Tensor) -> Tensor:
        """Exact; broadcasts value [..., batch] against the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        s, n, a, b = torch.broadcast_tensors(value.double(), *(x.double() for x in (self.total_count, self.a, self.b)))
        log_w = self.state_probs.double().log().expand(s.shape + (3,))
        partial = log_w[..., 1] + beta_binomial_log_prob(a, b, s, n)
        out = torch.logaddexp(partial, torch.where(s == 0, log_w[..., 0], -math.inf))
        out = torch.logaddexp(out, torch.where(s == n, log_w[..., 2], -math.inf))
        outside = (s < 0) | (s > n) | (s != s.round())
        return out.masked_fill(outside, -math.inf).to(self.state_probs.dtype)

    def sample(self, sample_shape=torch.Size()):
        """Inverse-CDF draw over the support 0..max(n)."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            pmf = self._pmf_table()
            cdf = pmf.cumsum(0).reshape((pmf.shape[0],) + (1,) * len(sample_shape) + self.batch_shape)
            u = torch.rand(shape, dtype=cdf.dtype) * cdf[-1]
            return (u.unsqueeze(0) > cdf).sum(0).clamp_max(self.total_count).to(self.state_probs.dtype)
