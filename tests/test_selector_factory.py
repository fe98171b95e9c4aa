"""One factory: every way in (loop, replay, streamed replay, bench, verl, TRL) builds its Selector
through `selector_factory.build_selector`, and refuses a bad name or option with the same line."""

import sys

import numpy as np
import pandas as pd
import pytest

from mpts.models.base import PromptPool
from mpts.training import selector_factory
from mpts.training.config import ConfigError, ComponentConfig, load_config
from mpts.training.selector import Selector
from mpts.training.selector_factory import Fields, SelectorConfigError, build_selector, plan_selector

TRACE = pd.DataFrame({"step": [0, 0, 1, 1, 2], "prompt_id": [0, 1, 0, 2, 0],
                      "successes": [2, 8, 3, 0, 4], "trials": [4, 8, 4, 8, 4]})


def run_loop(tmp_path):
    from mpts.training.loop import run
    run(load_config("quickstart", ["steps=2", "batch_size=8", "candidate_ratio=2", "env.num_prompts=100",
                                   "env.eval_prompts=20", "posterior_draws_prompts=10"]), tmp_path / "run")


def run_replay(tmp_path):
    from mpts.training.replay import replay
    replay(TRACE, "beta")


def run_replay_file(tmp_path):
    from mpts.training.replay_stream import replay_file
    TRACE.to_csv(tmp_path / "trace.csv", index=False)
    replay_file(tmp_path / "trace.csv", "beta")


def run_bench(tmp_path):
    from mpts.training.bench import bench
    bench("beta", pool=500, candidates=32, batch=8, steps=1, warmup=0)


def run_verl(tmp_path):
    from mpts.integrations.verl_selection import PromptSelection, read_selection_config
    PromptSelection(read_selection_config({}), np.arange(40), 4, 4, tmp_path / "run")


def run_trl(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import trl_harness
    trl_harness.make_trainer(tmp_path)


WAYS_IN = {"loop": run_loop, "replay": run_replay, "replay_file": run_replay_file, "bench": run_bench,
           "verl": run_verl, "trl": run_trl}


@pytest.mark.parametrize("way_in", sorted(WAYS_IN))
def test_every_way_in_builds_its_selector_in_the_factory(way_in, tmp_path, monkeypatch):
    """A Selector constructed anywhere but inside `build_selector` is one a way in built itself."""
    built, original = [], Selector.__init__

    def spy(self, *args, **kwargs):
        frame, inside = sys._getframe(1), False
        while frame is not None and not inside:
            inside = frame.f_code is build_selector.__code__
            frame = frame.f_back
        built.append(inside)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Selector, "__init__", spy)
    WAYS_IN[way_in](tmp_path)
    assert built, f"{way_in} built no Selector"
    assert all(built), f"{way_in} built {built.count(False)} of its {len(built)} Selectors outside the factory"


def test_the_same_bad_predictor_is_refused_alike_by_every_way_in(tmp_path):
    from mpts.integrations.verl_selection import VerlSelectionError, read_selection_config
    from mpts.training.bench import bench
    from mpts.training.replay import replay

    expected = "predictor.name: unknown predictor 'nope'; known: "
    with pytest.raises(ConfigError, match=expected):
        load_config("quickstart", ["predictor.name=nope"])
    for call in (lambda: replay(TRACE, "nope"), lambda: bench("nope", pool=100, candidates=8, batch=2, steps=1)):
        with pytest.raises(SelectorConfigError, match="^" + expected):
            call()
    with pytest.raises(VerlSelectionError, match="^mpts." + expected):
        read_selection_config({"predictor": {"name": "nope"}})


@pytest.mark.parametrize("arguments, message", [
    (dict(predictor="nope"), "predictor.name: unknown predictor 'nope'; known: beta, "),
    (dict(predictor=3), "predictor.name must be a name (a string), got int"),
    (dict(predictor="beta", predictor_options=[0.5]), "predictor must be a mapping of option names to values, got list"),
    (dict(predictor="beta", predictor_options={"decai": 0.5}), "predictor: decai: unknown key (known: decay, "),
    (dict(predictor="beta", predictor_options={"decay": 2.0}), "predictor: decay: "),
    (dict(predictor="beta", rule_options={"target": 0.5}), "acquisition: options given without a rule"),
    (dict(predictor="beta", rule="nope"), "acquisition.name: unknown acquisition rule 'nope'; known: "),
    (dict(predictor="beta", rule="thompson_target", rule_options={"target": 2}), "acquisition: target: "),
    (dict(predictor="beta", rule="oracle", trainer="TRL"),
     "acquisition.name: acquisition 'oracle' cannot drive TRL: it needs the true success rates, "),
    (dict(predictor="beta", rule="dynamic_sampling", trainer="verl"),
     "acquisition.name: acquisition 'dynamic_sampling' cannot drive verl: it rolls out every candidate, "),
    (dict(predictor="beta", predictor_options={"decai": 1}, fields=Fields("p", "opts of {name}", "r", "r")),
     "opts of beta: decai: unknown key"),
])
def test_plan_refuses_in_one_line_naming_the_field(arguments, message):
    with pytest.raises(SelectorConfigError) as refused:
        plan_selector(**arguments)
    text = str(refused.value)
    assert text.startswith(message) and "\n" not in text, text


def test_a_plan_builds_the_named_parts_with_their_options():
    plan = plan_selector(ComponentConfig(name="beta", decay=0.8), ComponentConfig(name="thompson_target", target=0.3))
    selector = build_selector(plan, PromptPool(size=10), k=4, seed=7, ids=[f"p{i}" for i in range(10)])
    assert (selector.predictor.name, selector.predictor.options.decay) == ("beta", 0.8)
    assert (selector.rule.name, selector.rule.options.target, selector.k) == ("thompson_target", 0.3, 4)
    assert selector.streams.seed == 7 and selector.sample_candidates(3, 0)[0].startswith("p")
    bare = build_selector(plan_selector("beta"), PromptPool(size=10), seed=0)  # replay: no rule, no k
    assert bare.rule is None and bare.k is None
    assert selector_factory.Fields().prefixed("mpts.").rule == "mpts.acquisition.name"
