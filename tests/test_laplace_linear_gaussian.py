"""`inference.adf.laplace_linear_gaussian`: exact where Laplace is exact, and Newton's mode where it is not."""

import math

import torch
from scipy import optimize

from mpts.inference.adf import laplace_linear_gaussian


def problem(seed: int = 0, m: int = 5, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(m, generator=g, dtype=torch.float64)
    root = torch.randn(m, m, generator=g, dtype=torch.float64)
    covariance = root @ root.T / m + 0.5 * torch.eye(m, dtype=torch.float64)
    design = torch.randn(n, m, generator=g, dtype=torch.float64)
    offset = torch.randn(n, generator=g, dtype=torch.float64)
    return loc, torch.linalg.cholesky(covariance), covariance, design, offset, g


def test_gaussian_outcomes_give_the_kalman_update():
    """y_j ~ N(f_j, v): the posterior is Gaussian, so the Laplace projection is Bayes' rule exactly."""
    loc, scale_tril, covariance, design, offset, g = problem()
    noise = 0.3
    y = torch.randn(design.shape[0], generator=g, dtype=torch.float64)

    def log_likelihood(f):
        value = -0.5 * (y - f).square() / noise - 0.5 * math.log(2 * math.pi * noise)
        return value, (y - f) / noise, torch.full_like(f, -1 / noise)

    (post_loc, post_tril), info = laplace_linear_gaussian(loc, scale_tril, design, offset, log_likelihood)
    gain = covariance @ design.T @ torch.linalg.inv(design @ covariance @ design.T + noise * torch.eye(len(y)))
    torch.testing.assert_close(post_loc, loc + gain @ (y - offset - design @ loc))
    torch.testing.assert_close(post_tril @ post_tril.T, covariance - gain @ design @ covariance)
    # -log p(y) of the linear-Gaussian model, which Laplace gets exactly
    marginal = torch.distributions.MultivariateNormal(offset + design @ loc,
                                                      design @ covariance @ design.T + noise * torch.eye(len(y)))
    assert abs(info["elbo"][0] + float(marginal.log_prob(y))) < 1e-6


def test_logistic_outcomes_reach_the_mode_with_its_curvature():
    """Binomial-logit outcomes: the posterior mean is the log joint's mode (scipy's optimiser agrees)
    and the covariance the inverse Hessian there."""
    loc, scale_tril, covariance, design, offset, g = problem(1)
    trials = torch.full((design.shape[0],), 8.0, dtype=torch.float64)
    successes = torch.binomial(trials, torch.full_like(trials, 0.3), generator=g)

    def log_likelihood(f):
        p = torch.sigmoid(f)
        return (successes * torch.nn.functional.logsigmoid(f) + (trials - successes) * torch.nn.functional.logsigmoid(-f),
                successes - trials * p, -trials * p * (1 - p))

    (post_loc, post_tril), _ = laplace_linear_gaussian(loc, scale_tril, design, offset, log_likelihood)
    precision = torch.linalg.inv(covariance)

    def negative_log_joint(u):
        u = torch.from_numpy(u)
        return float(-log_likelihood(offset + design @ u)[0].sum() + 0.5 * (u - loc) @ precision @ (u - loc))

    mode = optimize.minimize(negative_log_joint, loc.numpy(), method="BFGS", options={"gtol": 1e-10}).x
    torch.testing.assert_close(post_loc, torch.from_numpy(mode), atol=1e-5, rtol=0)
    weights = trials * torch.sigmoid(offset + design @ post_loc) * (1 - torch.sigmoid(offset + design @ post_loc))
    hessian = precision + design.T @ (weights.unsqueeze(-1) * design)
    torch.testing.assert_close(post_tril @ post_tril.T, torch.linalg.inv(hessian))
