"""Every registered predictor has a simulation-based calibration check on its own generative model.

The checks live beside their helpers (`test_predictive_conformance.py`: beta, hmm3, hmm3_pooled;
`test_sbc.py`: id_vae, gp); this file only maps each registry name to its check, so a predictor
registered without one fails here instead of going unchecked.
"""

import pytest

import test_predictive_conformance as conformance
import test_sbc as sbc
from mpts.models.registry import PREDICTORS

# Read at collection, as the parametrised checks read it: a plugin a test registers while the
# suite runs (examples/model_predictor) is not a library predictor.
REGISTERED = PREDICTORS.names()

SBC_CHECKS = {
    "beta": conformance.test_beta_is_calibrated_on_its_own_generative_model,
    "hmm3": conformance.test_hmm3_is_calibrated_on_its_own_generative_model,
    "hmm3_pooled": conformance.test_hmm3_is_calibrated_on_its_own_generative_model,
    "id_vae": sbc.test_id_vae_is_calibrated_on_its_own_generative_model,
    "gp": sbc.test_gp_is_calibrated_on_its_own_generative_model,
}


def missing_checks(names):
    return sorted(set(names) - set(SBC_CHECKS))


def test_every_registered_predictor_has_a_calibration_check():
    missing = missing_checks(REGISTERED)
    assert not missing, f"no simulation-based calibration check registered for {missing}: add one to SBC_CHECKS"
    for name, check in SBC_CHECKS.items():  # each entry names a collected test, not a leftover
        assert callable(check) and check.__name__.startswith("test_"), name


def test_a_registered_predictor_without_a_check_is_reported():
    assert missing_checks([*REGISTERED, "unchecked"]) == ["unchecked"]
