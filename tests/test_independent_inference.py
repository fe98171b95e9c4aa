"""Every registered predictor's production update against an independent inference on its program.

`tests/test_programs.py` checks production against inference on the program the predictor
declares (for "svi" predictors that is the production call itself). Here each predictor is
checked against code that shares none of its inference: forgetting and lazy catch-up are swept
eagerly, step by step, and the posterior is computed another way:

- beta: the posterior density of p on a 20 000-point grid (`reference_beta`);
- hmm3, hmm3_pooled: the DPS filter in float64 NumPy, the previous state enumerated, the partial
  state's Beta checked with scipy's Beta-Binomial (`reference_hmm3`);
- id_vae: the code rows' exact posterior through a dense grid over the 1-D logit term, and the
  predictive with autograd's Jacobian in z (`reference_id_vae`);
- gp: the exact posterior of its space-time model by importance sampling, kernel and quadrature written out
  (`reference_gp`).

A predictor registered without an entry in REFERENCES fails here. The mutation tests at the end
show each check fails when the update it guards is broken.
"""

import pytest
import torch

import reference_beta
import reference_gp
import reference_hmm3
import reference_id_vae
from mpts.models import beta_bernoulli, hmm3, id_vae
from mpts.models.registry import PREDICTORS

REFERENCES = {
    "beta": reference_beta.check,
    "hmm3": reference_hmm3.check,
    "hmm3_pooled": reference_hmm3.check,
    "id_vae": reference_id_vae.check,
    "gp": reference_gp.check,
}


@pytest.mark.parametrize("name", PREDICTORS.names())
def test_production_update_agrees_with_an_independent_inference(name):
    if name not in REFERENCES:
        pytest.fail(f"no independent check registered for {name}: add one to REFERENCES in {__name__}")
    REFERENCES[name](name)


def test_a_predictor_without_a_reference_fails():
    with pytest.raises(pytest.fail.Exception, match="no independent check registered for unchecked"):
        test_production_update_agrees_with_an_independent_inference("unchecked")


# -- each check fails when the update it guards is broken ------------------------------------------
def test_beta_check_catches_an_update_that_forgets_twice(monkeypatch):
    exact = beta_bernoulli.conjugate_update

    def forgets_twice(prior_alpha, prior_beta, successes, trials):
        return exact(0.8 * prior_alpha + 0.2, 0.8 * prior_beta + 0.2, successes, trials)

    monkeypatch.setattr(beta_bernoulli, "conjugate_update", forgets_twice)
    with pytest.raises(AssertionError, match="differs from the grid"):
        reference_beta.check("beta")


def test_beta_check_catches_an_update_that_drops_the_failures(monkeypatch):
    exact = beta_bernoulli.conjugate_update
    monkeypatch.setattr(beta_bernoulli, "conjugate_update",
                        lambda alpha, beta, successes, trials: exact(alpha, beta, successes, successes))
    with pytest.raises(AssertionError, match="differs from the grid"):
        reference_beta.check("beta")


def test_hmm3_check_catches_a_catch_up_that_forgets_twice(monkeypatch):
    exact = hmm3.propagate
    monkeypatch.setattr(hmm3, "propagate", lambda belief, prior, excess, lam, steps, tol=1e-7:
                        exact(belief, prior, excess, lam * lam, steps, tol))
    with pytest.raises(AssertionError, match="state belief differs"):
        reference_hmm3.check("hmm3")


def test_id_vae_check_catches_an_update_that_skips_the_code_rows(monkeypatch):
    monkeypatch.setattr(id_vae, "condition_rows", lambda rows_loc, rows_var, *rest: (rows_loc, rows_var))
    with pytest.raises(AssertionError, match="code rows differ"):
        reference_id_vae.check("id_vae")


def test_gp_check_catches_an_update_that_forgets_twice(monkeypatch):
    from mpts.models import gp_embed
    exact = gp_embed.factor
    monkeypatch.setattr(gp_embed, "factor", lambda lam, delta=1, *rest, **kw: exact(lam, 2 * torch.as_tensor(delta),
                                                                                     *rest, **kw))
    with pytest.raises(AssertionError, match="from the exact posterior"):
        reference_gp.check("gp")
