"""The streaming SVI engine: state in, state out; no global parameter store; rollback for free."""

import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam

from mpts.inference import StreamingSVI, SVIState, decay_concentration, decay_gaussian


def gaussian_model(prior_loc, data):
    mu = pyro.sample("mu", dist.Normal(prior_loc, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


class GaussianGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.tensor(0.0))
        self.scale = PyroParam(torch.tensor(1.0), constraint=dist.constraints.positive)

    def forward(self, prior_loc, data):
        pyro.sample("mu", dist.Normal(self.loc, self.scale))


LOC = "guide.loc_unconstrained"


def engine(steps=300):
    return StreamingSVI(gaussian_model, GaussianGuide(), steps=steps, lr=0.05)


def test_engines_do_not_share_parameters_and_leave_the_global_store_empty():
    pyro.clear_param_store()
    a, b = engine(), engine()
    state_a, _ = a.update(a.init(), torch.tensor(0.0), torch.full((50,), 3.0), seed=0)
    state_b, _ = b.update(b.init(), torch.tensor(0.0), torch.full((50,), -3.0), seed=0)
    assert state_a.params[LOC].item() > 2.0 and state_b.params[LOC].item() < -2.0
    assert len(pyro.get_param_store()) == 0


def test_an_update_never_writes_its_input_state_and_a_failed_one_returns_it():
    svi = engine(50)
    state, _ = svi.update(svi.init(), torch.tensor(0.0), torch.full((20,), 1.0), seed=0)
    frozen = {key: value.clone() for key, value in state.tensors().items()}
    moved, info = svi.update(state, torch.tensor(0.0), torch.full((20,), 4.0), seed=1)
    assert "elbo" in info and not torch.equal(moved.params[LOC], state.params[LOC])
    for key, value in state.tensors().items():
        assert torch.equal(value, frozen[key]), key
    for bad in [(torch.tensor(0.0), torch.tensor([float("nan")])), (torch.tensor(float("inf")), torch.full((20,), 1.0))]:
        same, info = svi.update(state, *bad, seed=2)
        assert same is state and "failed" in info
        assert torch.equal(svi.objective.guide.loc_unconstrained.detach(), state.params[LOC])  # the modules hold it again


def test_state_round_trips_through_its_tensors_and_updates_are_seeded():
    svi = engine(20)
    state, _ = svi.update(svi.init(), torch.tensor(0.0), torch.full((20,), 1.0), seed=0)
    names = {LOC, "guide.scale_unconstrained"}  # the guide module's parameters, by their module path
    assert set(state.tensors()) == {"lr"} | {f"{part}.{name}" for part in ("params", "exp_avg", "exp_avg_sq",
                                                                           "adam_steps") for name in names}
    copy = SVIState.from_tensors({key: value.clone() for key, value in state.tensors().items()})
    other = engine(20)
    a, _ = svi.update(state, torch.tensor(0.0), torch.full((20,), 2.0), seed=5)
    b, _ = other.update(copy, torch.tensor(0.0), torch.full((20,), 2.0), seed=5)
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    c, _ = svi.update(state, torch.tensor(0.0), torch.full((20,), 2.0), seed=6)
    assert not torch.equal(a.params["guide.scale_unconstrained"], c.params["guide.scale_unconstrained"])  # the draws differ


def test_forgetting_composes_geometrically():
    c = torch.tensor([10.0, 2.0])
    once = decay_concentration(c, 1.0, 0.9, delta=3)
    thrice = decay_concentration(decay_concentration(decay_concentration(c, 1.0, 0.9), 1.0, 0.9), 1.0, 0.9)
    assert torch.allclose(once, thrice)
    loc, scale = decay_gaussian(torch.tensor(2.0), torch.tensor(0.1), 0.0, 1.0, 0.0)
    assert loc.item() == pytest.approx(0.0) and scale.item() == pytest.approx(1.0)
    loc, scale = decay_gaussian(torch.tensor(2.0), torch.tensor(0.1), 0.0, 1.0, 1.0)
    assert loc.item() == pytest.approx(2.0) and scale.item() == pytest.approx(0.1)


def test_every_predictor_forgets_under_the_one_option_name_decay():
    from mpts.models.registry import PREDICTORS
    old_names = {"forgetting", "code_forgetting", "pool_decay", "fit_decay"}
    for name in PREDICTORS.names():
        fields = set(PREDICTORS.get(name).Options.model_fields)
        assert "decay" in fields and not fields & old_names, name
    hmm3 = PREDICTORS.get("hmm3").Options
    with pytest.raises(ValueError, match="unknown part 'bogus'; parts are transitions, pool, fits"):
        hmm3(decay={"bogus": 0.5})
    with pytest.raises(ValueError, match="pool must be in"):
        hmm3(decay={"pool": 1.5})
    with pytest.raises(ValueError, match="pool_decay"):
        hmm3(pool_decay=0.9)
    from mpts.models import PromptPool
    assert PREDICTORS.get("hmm3")(PromptPool(4), hmm3(decay=0.5)).rates == {"transitions": 0.5, "pool": 0.5, "fits": 0.5}
    assert PREDICTORS.get("hmm3")(PromptPool(4), hmm3(decay={"pool": 1.0})).rates == {
        "transitions": 0.7, "pool": 1.0, "fits": 0.95}


def test_no_global_parameter_store_or_private_pyro_attributes_in_the_library():
    root = Path(__file__).resolve().parents[1]
    forbidden = re.compile(r"pyro\.param\(|get_param_store|clear_param_store|pyro\.module\(|"
                           r"\._state_waiting|\.pop\(None|_sync_nets|_refresh\b|\.scope\(")
    private = re.compile(r"(?:pyro|optim|svi|engine)\S*\._[a-z]\w*")
    offenders = []
    for folder in ("inference", "models"):
        for path in sorted((root / folder).glob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if path.name == "streaming.py" and "pyro.get_param_store().scope()" in code:
                    continue  # the one allowed use: each update's own empty store, the user's restored after
                if forbidden.search(code) or private.search(code):
                    offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_importing_mpts_leaves_pyro_settings_unchanged():
    """No process-wide Pyro setting (module_local_params above all) changes on import."""
    import subprocess
    import sys
    script = ("import pyro; before = dict(pyro.settings.get()); "
              "import mpts.inference, mpts.models, mpts.models.beta_bernoulli, mpts.models.hmm3, mpts.models.id_vae, "
              "mpts.training.selector; "
              "after = dict(pyro.settings.get()); "
              "assert before == after, (before, after)")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_an_update_leaves_the_users_param_store_and_settings_as_they_were():
    pyro.clear_param_store()
    pyro.param("users_own", torch.tensor(3.0))
    settings = dict(pyro.settings.get())
    svi = engine(steps=5)
    state, info = svi.update(svi.init(), torch.tensor(0.0), torch.randn(10), seed=0)
    assert "failed" not in info
    assert list(pyro.get_param_store().keys()) == ["users_own"]
    assert float(pyro.param("users_own")) == 3.0
    assert dict(pyro.settings.get()) == settings
    pyro.clear_param_store()
