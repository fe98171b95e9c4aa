"""Configs: named and file configs load; overrides apply; bad keys and values are clear errors."""

import pytest

from mpts.training.config import ConfigError, apply_overrides, load_config, named_configs


def test_named_config_loads_and_overrides_apply():
    assert "quickstart" in named_configs()
    config = load_config("quickstart", ["steps=7", "predictor.decay=0.5", "env.num_prompts=900"])
    assert config.steps == 7
    assert config.predictor.options["decay"] == 0.5
    assert config.env.options["num_prompts"] == 900


def test_user_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nsteps: 3\npredictor: {name: beta, decay: 0.7}\nacquisition: {name: uniform}\n")
    config = load_config(path)
    assert (config.name, config.steps, config.acquisition.name) == ("mine", 3, "uniform")


@pytest.mark.parametrize("overrides, message", [
    (["stepz=3"], "stepz: unknown key"),
    (["steps=-1"], "steps: Input should be greater than or equal to 1"),
    (["predictor.name=nope"], "predictor.name: unknown predictor 'nope'"),
    (["predictor.decay_rate=0.3"], "predictor: decay_rate: unknown key"),
    (["predictor.decay=1.5"], "predictor: decay: Input should be less than or equal to 1"),
    (["acquisition.name=best"], "acquisition.name: unknown acquisition"),
    (["acquisition.target=2"], "acquisition: target"),
    (["env.name=mars"], "env.name: unknown environment"),
    (["env.num_promptz=5"], "env: num_promptz: unknown key"),
    (["ablation.seedz=[1]"], "ablation.seedz: unknown key"),
])
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("quickstart", overrides)


def test_missing_named_config_and_file():
    with pytest.raises(ConfigError, match="no config named 'nosuch'"):
        load_config("nosuch")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_plugins_are_imported_so_their_predictors_validate(tmp_path, monkeypatch):
    (tmp_path / "my_plugin_mod.py").write_text(
        "from mpts.models import register_predictor\n"
        "from mpts.models.beta_bernoulli import BetaBernoulli\n"
        "@register_predictor\n"
        "class Mine(BetaBernoulli):\n"
        "    name = 'mine_from_plugin'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config("quickstart", ["plugins=[my_plugin_mod]", "predictor={name: mine_from_plugin, decay: 0.5}"])
    assert config.predictor.name == "mine_from_plugin"
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module_x'"):
        load_config("quickstart", ["plugins=[no_such_module_x]"])


def test_grpo_options_are_one_nested_section_checked_against_grpo_config():
    from mpts.training.environments.lm.env import LMOptions
    from mpts.training.environments.lm.grpo import GRPOConfig

    config = load_config("lm_tiny", ["env.grpo.kl_coef=0.05"])
    options = config.env.with_options(LMOptions)
    assert isinstance(options.grpo, GRPOConfig) and options.grpo.kl_coef == 0.05 and options.grpo.lr == 1.0e-4
    assert not set(GRPOConfig.model_fields) & set(LMOptions.model_fields)  # no GRPO field repeated at env level
    with pytest.raises(ConfigError, match="grpo.lrr: unknown key"):
        load_config("lm_tiny", ["env.grpo.lrr=0.1"])
    with pytest.raises(ConfigError, match="env.*lr: unknown key"):
        load_config("lm_tiny", ["env.lr=0.1"])  # the old flat spelling is refused, not ignored


def test_config_comments_state_no_measured_duration_without_the_command_that_measured_it():
    import re
    from importlib import resources

    for path in resources.files("mpts.training.configs").iterdir():
        if not path.name.endswith(".yaml"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.partition("#")[2]
            if re.search(r"\d\s*(minutes?|seconds?|hours?|ms|s/step)\b|\bminutes?\b", comment):
                assert "mpts " in comment, f"{path.name}:{number}: {comment.strip()}"


def test_grpo_section_refuses_booleans_and_non_finite_numbers():
    for bad, field in (("env.grpo.lr=true", "lr"), ("env.grpo.kl_coef=.nan", "kl_coef"),
                       ("env.grpo.micro_batch_size=-1", "micro_batch_size")):
        with pytest.raises(ConfigError, match=field):
            load_config("lm_tiny", [bad])


def test_make_demo_runs_the_small_demo_ablation_which_still_compares_against_baselines():
    from pathlib import Path

    from mpts.training.sweep import expand_grid

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "$(BIN)/mpts ablate demo " in makefile
    demo, full = load_config("demo"), load_config("quickstart")
    runs = expand_grid(demo)
    rules = {arm.acquisition if isinstance(arm.acquisition, str) else arm.acquisition["name"] for arm in demo.ablation.arms}
    assert {"uniform", "dynamic_sampling", "oracle"} <= rules and len(rules) >= 4  # baselines and predictive rules
    # a fraction of the full ablation's work (runs x steps), so it finishes while a newcomer watches
    assert len(runs) * demo.steps <= len(expand_grid(full)) * full.steps / 4
