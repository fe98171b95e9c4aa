"""The streaming SVI engine: isolated parameter stores, rollback on failure, state round-trip."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from mpts.inference import StreamingSVI, decay_concentration, decay_gaussian


def gaussian_model(prior_loc, data):
    mu = pyro.sample("mu", dist.Normal(prior_loc, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


def gaussian_guide(prior_loc, data):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def test_engines_do_not_share_parameters():
    pyro.set_rng_seed(0)
    a = StreamingSVI(gaussian_model, gaussian_guide, steps=300, lr=0.05)
    b = StreamingSVI(gaussian_model, gaussian_guide, steps=300, lr=0.05)
    a.update(torch.tensor(0.0), torch.full((50,), 3.0))
    b.update(torch.tensor(0.0), torch.full((50,), -3.0))
    assert a.param("loc").item() > 2.0
    assert b.param("loc").item() < -2.0
    assert "loc" not in pyro.get_param_store()


def test_a_failing_update_leaves_parameters_and_optimiser_unchanged():
    pyro.set_rng_seed(0)
    engine = StreamingSVI(gaussian_model, gaussian_guide, steps=50, lr=0.05)
    engine.update(torch.tensor(0.0), torch.full((20,), 1.0))
    before = engine.state_dict()
    with pytest.raises((ValueError, FloatingPointError)):  # Pyro's validation or the engine's own check
        engine.update(torch.tensor(0.0), torch.tensor([float("nan")]))
    with pytest.raises(FloatingPointError, match="non-finite"):
        engine.update(torch.tensor(float("inf")), torch.full((20,), 1.0))
    assert torch.equal(engine.param("loc"), before["params"]["params"]["loc"])
    engine2 = StreamingSVI(gaussian_model, gaussian_guide, steps=50, lr=0.05)
    engine2.load_state_dict(before)
    pyro.set_rng_seed(1)
    engine.update(torch.tensor(0.0), torch.full((20,), 1.0))
    pyro.set_rng_seed(1)
    engine2.update(torch.tensor(0.0), torch.full((20,), 1.0))
    assert torch.allclose(engine.param("loc"), engine2.param("loc"))


def test_forgetting_composes_geometrically():
    c = torch.tensor([10.0, 2.0])
    once = decay_concentration(c, 1.0, 0.9, delta=3)
    thrice = decay_concentration(decay_concentration(decay_concentration(c, 1.0, 0.9), 1.0, 0.9), 1.0, 0.9)
    assert torch.allclose(once, thrice)
    loc, scale = decay_gaussian(torch.tensor(2.0), torch.tensor(0.1), 0.0, 1.0, 0.0)
    assert loc.item() == pytest.approx(0.0) and scale.item() == pytest.approx(1.0)
    loc, scale = decay_gaussian(torch.tensor(2.0), torch.tensor(0.1), 0.0, 1.0, 1.0)
    assert loc.item() == pytest.approx(2.0) and scale.item() == pytest.approx(0.1)


def test_optimiser_state_is_saved_by_parameter_name():
    pyro.set_rng_seed(0)
    engine = StreamingSVI(gaussian_model, gaussian_guide, steps=5, lr=0.05)
    engine.update(torch.tensor(0.0), torch.full((20,), 1.0))
    saved = engine.state_dict()["optim"]
    assert set(saved) == {"loc", "scale"}
