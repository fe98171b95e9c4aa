"""Fit the simulated learner to a real trace, then check the fit by replaying the trace.

The fit is a Pyro program of the simulator's own generative story (training/environments/
simulator.py), in logit units::

    mu_c  = difficulty_mean + cluster_scale * z_c,   z_c ~ Normal(0, 1)      cluster difficulties
    d_i   = mu_c(i) + difficulty_std * e_i,          e_i ~ Normal(0, 1)      prompt difficulties
    theta_c(0) = 0
    theta_c(t+1) = theta_c(t) - forgetting * [G_c(t) = 0] * theta_c(t)
                   + learning_rate * (G_c(t) + transfer * mean_c' G_c'(t))
    S_j   ~ Binomial(k_j, ceiling * sigmoid(theta_c(t_j) - d_i(j)))

G_c(t) is the simulator's per-cluster GRPO signal of step t's trained groups. In the fit it is
computed from the trace's *observed* groups, so competence is a deterministic function of the
global parameters and the likelihood is an ordinary Binomial one (no latent time series).

What the data cannot tell apart is fixed by convention and said so in the output: the slope
(only slope * difficulty and slope * learning rate are identified, so slope = 1), the initial
competence (only its difference from the difficulties is identified, so theta_0 = 0), transfer
when the trace has one cluster, forgetting when no cluster ever goes a step without signal.

Inference: MAP + Laplace (Pyro's AutoLaplaceApproximation). Each prompt's difficulty offset is
integrated out on a grid, so the only latents are the handful of global parameters: their
posterior is correlated (learning rate against transfer, difficulty mean against spread), which
the Laplace approximation's full covariance keeps and a mean-field guide would not, and the
Hessian of ~10 parameters is cheap. A Gaussian in unconstrained space gives skewed intervals for
positive parameters. The recovery test (tests/test_fit_sim.py) measures how well they cover.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import yaml
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation, init_to_median
from torch import Tensor

from mpts.training.threads import intra_op_threads

GLOBAL_SITES = ("difficulty_mean", "cluster_scale", "difficulty_std", "learning_rate", "transfer", "forgetting",
                "ceiling")
# Share of steps on which the trace may fall outside the replay's 90% band before the check
# flags a statistic: 0.1 is expected from a well-specified fit; steps are correlated, so the
# threshold leaves room (tests/test_fit_sim.py measures both sides of it).
MISFIT_SHARE = 0.3
CHECKED_STATISTICS = ("success_rate", "effective_ratio", "share_all_fail", "share_all_pass")


def priors(num_clusters: int) -> dict[str, dist.Distribution]:
    """The global parameters' priors (logit units). One place, read by the model and the report."""
    out = {"difficulty_mean": dist.Normal(0.0, 3.0),
           "difficulty_std": dist.HalfNormal(3.0),
           "learning_rate": dist.HalfNormal(2.0),
           "transfer": dist.HalfNormal(1.0),
           "forgetting": dist.Beta(1.0, 4.0),
           # the highest success rate a prompt reaches: a policy sampled at temperature 1 keeps
           # making errors on prompts it has learned (sim-to-real on lm_tiny); mode 1
           "ceiling": dist.Beta(8.0, 1.0)}
    if num_clusters > 1:
        out["cluster_scale"] = dist.HalfNormal(2.0)
    return out


@dataclass(frozen=True)
class FitData:
    """A trace as tensors: one entry per (step, prompt) group; steps renumbered 0..T-1."""
    step: Tensor          # (n,) long, 0..T-1
    prompt: Tensor        # (n,) long, 0..P-1 (rows of prompt_ids)
    successes: Tensor     # (n,) float
    trials: Tensor        # (n,) float
    trained: Tensor       # (n,) bool: the group entered the policy update (the trace's `kept`)
    prompt_cluster: Tensor  # (P,) long, 0..C-1
    prompt_ids: np.ndarray  # (P,) the trace's labels
    steps: np.ndarray       # (T,) the trace's step values
    num_clusters: int
    source: str = ""
    cluster_labels: tuple = ()  # the trace's label of cluster 0..C-1 (e.g. difficulty levels)
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def fit_data(trace: pd.DataFrame, clusters: dict[Any, int] | None = None, source: str = "",
             run_config: dict[str, Any] | None = None) -> FitData:
    """FitData from a trace with step, prompt_id, successes, trials (and optional kept, failed)."""
    frame = trace
    if "failed" in frame.columns:
        frame = frame[~frame["failed"].astype(bool)]
    if frame.empty:
        raise ValueError(f"{source or 'trace'}: no rolled-out group to fit")
    steps, step_index = np.unique(frame["step"].to_numpy(), return_inverse=True)
    ids, prompt_index = np.unique(frame["prompt_id"].to_numpy(), return_inverse=True)
    if clusters is None:
        cluster_of = np.zeros(len(ids), dtype=np.int64)
        cluster_labels: tuple = ()
    else:
        missing = [i for i in ids if i not in clusters]
        if missing:
            raise ValueError(f"{source or 'trace'}: no cluster given for prompt {missing[0]!r}")
        labels = np.array([clusters[i] for i in ids])
        unique_labels, cluster_of = np.unique(labels, return_inverse=True)
        cluster_labels = tuple(x.item() if hasattr(x, "item") else x for x in unique_labels)
    trained = frame["kept"].to_numpy(bool) if "kept" in frame.columns else np.ones(len(frame), bool)
    return FitData(step=torch.as_tensor(step_index, dtype=torch.long),
                   prompt=torch.as_tensor(prompt_index, dtype=torch.long),
                   successes=torch.as_tensor(frame["successes"].to_numpy(np.float64), dtype=torch.float32),
                   trials=torch.as_tensor(frame["trials"].to_numpy(np.float64), dtype=torch.float32),
                   trained=torch.as_tensor(trained.copy()),
                   prompt_cluster=torch.as_tensor(cluster_of, dtype=torch.long),
                   prompt_ids=ids, steps=steps, num_clusters=int(cluster_of.max()) + 1,
                   source=source, cluster_labels=cluster_labels, run_config=dict(run_config or {}))


# -- the simulator's update rule, vectorised over parameter draws ------------------------------
def step_signal(data: FitData, successes: Tensor) -> Tensor:
    """G[..., t, c]: the simulator's per-cluster signal of step t, from `successes` (..., n)."""
    rate = successes / data.trials
    signal = (rate * (1.0 - rate)).clamp_min(0.0).sqrt() * data.trained
    cell = data.step * data.num_clusters + data.prompt_cluster[data.prompt]
    flat = torch.zeros(*successes.shape[:-1], data.num_steps * data.num_clusters)
    flat = flat.index_add(-1, cell, signal)
    per_step = torch.zeros(data.num_steps).index_add(0, data.step, data.trained.float()).clamp_min(1.0)
    return flat.reshape(*successes.shape[:-1], data.num_steps, data.num_clusters) / per_step[:, None]


def competence_path(signal: Tensor, learning_rate: Tensor, transfer: Tensor, forgetting: Tensor) -> Tensor:
    """theta[..., t, c] before step t's update, from G[..., t, c] (parameters shaped (...,))."""
    lr, tau, f = (x[..., None] for x in (learning_rate, transfer, forgetting))
    theta = torch.zeros(signal.shape[:-2] + signal.shape[-1:])
    path = []
    for t in range(signal.shape[-2]):
        path.append(theta)
        g = signal[..., t, :]
        theta = theta - f * (g == 0) * theta + lr * (g + tau * g.mean(-1, keepdim=True))
    return torch.stack(path, -2)


# -- the Pyro program ---------------------------------------------------------------------------
# Each prompt's offset e_i is integrated out on a fixed grid (trapezoid rule against the standard
# normal density): the integrand is smooth and Gaussian-like, where the trapezoid rule converges
# geometrically, and it leaves the program with only global latents, for which MAP + Laplace is
# cheap and exact in its Hessian. The grid spans +-6 prior sd.
GRID = torch.linspace(-6.0, 6.0, 97)
LOG_GRID_WEIGHT = dist.Normal(0.0, 1.0).log_prob(GRID) + math.log(float(GRID[1] - GRID[0]))


def group_log_likelihood(data: FitData, g: dict[str, Tensor], signal: Tensor) -> Tensor:
    """(n, Q): log P(S_j | e_i(j) = GRID[q]) for every group j (the binomial coefficient dropped)."""
    scale = g.get("cluster_scale", torch.tensor(0.0))
    cluster_mean = g["difficulty_mean"] + scale * g["cluster_offset"]
    theta = competence_path(signal, g["learning_rate"], g["transfer"], g["forgetting"])
    cluster = data.prompt_cluster[data.prompt]
    logits = (theta[data.step, cluster] - cluster_mean[cluster])[:, None] - g["difficulty_std"] * GRID
    # p = ceiling * sigmoid(logits): log p and log(1 - p) = log((1 - c) + c * sigmoid(-logits)), stably
    log_c = torch.log(g["ceiling"])
    log_p = log_c + torch.nn.functional.logsigmoid(logits)
    log_q = torch.logaddexp(torch.log1p(-g["ceiling"]), log_c + torch.nn.functional.logsigmoid(-logits))
    s = data.successes[:, None]
    return s * log_p + (data.trials[:, None] - s) * log_q


def prompt_log_posterior(data: FitData, group_ll: Tensor) -> Tensor:
    """(P, Q): unnormalised log posterior of each prompt's offset on the grid."""
    per_prompt = torch.zeros(len(data.prompt_ids), len(GRID)).index_add(0, data.prompt, group_ll)
    return per_prompt + LOG_GRID_WEIGHT


def model(data: FitData, signal: Tensor) -> None:
    g = {name: pyro.sample(name, d) for name, d in priors(data.num_clusters).items()}
    with pyro.plate("clusters", data.num_clusters):
        g["cluster_offset"] = pyro.sample("cluster_offset", dist.Normal(0.0, 1.0))
    # prompts' difficulties d_i = mu_c + difficulty_std * e_i, e_i ~ Normal(0, 1), marginalised
    marginal = prompt_log_posterior(data, group_log_likelihood(data, g, signal)).logsumexp(-1)
    pyro.factor("prompt_difficulties", marginal.sum())


@dataclass
class FitResult:
    data: FitData
    elbo: list[float]
    seconds: float
    draws: dict[str, Tensor]  # posterior (Laplace) draws of every global site, (S, ...)

    def parameters(self) -> pd.DataFrame:
        """mean, sd, 5% and 95% of every global parameter, and how much the trace told about it."""
        rows = []
        prior = priors(self.data.num_clusters)
        for name in GLOBAL_SITES:
            if name not in prior:
                continue
            x = self.draws[name].double()
            prior_sd = float(prior[name].variance.sqrt())
            rows.append({"parameter": name, **_summary(x), "prior_sd": prior_sd,
                         "sd_over_prior": float(x.std()) / prior_sd,
                         "identified": identification(name, self.data, float(x.std()) / prior_sd)})
        mu = self.cluster_difficulties()
        for c in range(self.data.num_clusters):
            rows.append({"parameter": f"cluster_difficulty[{c}]", **_summary(mu[:, c].double()),
                         "prior_sd": math.nan, "sd_over_prior": math.nan, "identified": "yes"})
        return pd.DataFrame(rows)

    def cluster_difficulties(self) -> Tensor:
        scale = self.draws.get("cluster_scale", torch.zeros(self.draws["difficulty_mean"].shape))
        return self.draws["difficulty_mean"][:, None] + scale[:, None] * self.draws["cluster_offset"]

    def prompt_difficulties(self, num_draws: int, seed: int = 0) -> Tensor:
        """(S, P): each prompt's difficulty drawn from its grid posterior given each of the first
        `num_draws` global draws."""
        generator = torch.Generator().manual_seed(seed)
        signal = step_signal(self.data, self.data.successes)
        mu = self.cluster_difficulties()
        step = float(GRID[1] - GRID[0])
        out = []
        for i in range(num_draws):
            g = {name: value[i] for name, value in self.draws.items()}
            logp = prompt_log_posterior(self.data, group_log_likelihood(self.data, g, signal))
            q = torch.multinomial(torch.softmax(logp, -1), 1, generator=generator).squeeze(1)
            e = GRID[q] + (torch.rand(q.shape, generator=generator) - 0.5) * step
            out.append(mu[i][self.data.prompt_cluster] + g["difficulty_std"] * e)
        return torch.stack(out)


def _summary(x: Tensor) -> dict[str, float]:
    return {"mean": float(x.mean()), "sd": float(x.std()), "q05": float(x.quantile(0.05)),
            "q95": float(x.quantile(0.95))}


def identification(name: str, data: FitData, sd_over_prior: float) -> str:
    """'yes', or why the trace says little about the parameter (structural or measured)."""
    if name == "transfer" and data.num_clusters == 1:
        return "no: with one cluster only learning_rate * (1 + transfer) is identified"
    if name == "cluster_scale" and data.num_clusters < 3:
        return "weak: fewer than 3 clusters"
    if name == "forgetting":
        observed = step_signal(data, data.successes)
        if not bool((observed == 0).any()):
            return "no: no cluster ever went a step without signal, so forgetting never acted"
    if sd_over_prior > 0.5:
        return f"weak: posterior sd is {sd_over_prior:.2f} of the prior's"
    return "yes"


def fit(data: FitData, *, max_iterations: int = 200, seed: int = 0, num_draws: int = 400,
        threads: int | None = 1, attempts: int = 3) -> FitResult:
    """MAP of the program's global parameters, then Pyro's Laplace approximation (the Hessian at
    the mode, in unconstrained space); returns draws from it. The mode is found by L-BFGS on the
    negative log joint (AutoLaplaceApproximation's loss): the Hessian is only a covariance at a
    true mode, which a stochastic optimiser leaves too early. L-BFGS starts from a draw of the
    prior (init_to_median); a start from which it stops short of a mode (Hessian not positive
    definite) is retried from the next seed's, up to `attempts` starts. Runs in its own RNG and
    parameter scope, with `threads` intra-op threads (one is fastest on a loaded machine)."""
    signal = step_signal(data, data.successes)
    started = time.perf_counter()
    evaluations = []
    for attempt in range(attempts):
        draws, trace = _fit_once(data, signal, max_iterations, seed + attempt, num_draws, threads)
        evaluations.append(len(trace))
        if draws is not None:
            return FitResult(data=data, elbo=[-x for x in trace], seconds=time.perf_counter() - started,
                             draws=draws)
    raise ValueError(f"{data.source or 'trace'}: the fit found no proper mode (its Hessian is not positive definite "
                     f"from {attempts} starts, after {'/'.join(map(str, evaluations))} evaluations); the trace may "
                     f"be too short or every group all-0 / all-k")


def _fit_once(data: FitData, signal: Tensor, max_iterations: int, seed: int, num_draws: int,
              threads: int | None) -> tuple[dict[str, Tensor] | None, list[float]]:
    """One L-BFGS run from seed's start and its Laplace draws; None for the draws when the Hessian at
    the end point is not positive definite."""
    with torch.random.fork_rng(), pyro.get_param_store().scope(), intra_op_threads(threads):
        torch.manual_seed(seed)
        guide = AutoLaplaceApproximation(model, init_loc_fn=init_to_median)
        guide(data, signal)  # creates the guide's parameters
        loss_fn = Trace_ELBO().differentiable_loss
        optimiser = torch.optim.LBFGS(list(guide.parameters()), lr=1.0, max_iter=max_iterations,
                                      tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")
        trace: list[float] = []

        def closure() -> Tensor:
            optimiser.zero_grad()
            loss = loss_fn(model, guide, data, signal)
            loss.backward()
            trace.append(loss.item())
            return loss

        optimiser.step(closure)
        try:
            laplace = guide.laplace_approximation(data, signal)
        except torch.linalg.LinAlgError:
            return None, trace
        with torch.no_grad():
            samples = [laplace(data, signal) for _ in range(num_draws)]
    return {name: torch.stack([s[name] for s in samples]).detach() for name in samples[0]}, trace


# -- the posterior predictive check ---------------------------------------------------------------
def replay_statistics(data: FitData, successes: Tensor) -> dict[str, Tensor]:
    """Per-step statistics of outcomes `successes` (..., n): each (..., T)."""
    per_step = torch.zeros(data.num_steps).index_add(0, data.step, torch.ones(len(data.step)))

    def mean_over_step(x: Tensor) -> Tensor:
        out = torch.zeros(*x.shape[:-1], data.num_steps).index_add(-1, data.step, x)
        return out / per_step

    trials_per_step = torch.zeros(data.num_steps).index_add(0, data.step, data.trials)
    solved = torch.zeros(*successes.shape[:-1], data.num_steps).index_add(-1, data.step, successes)
    all_fail = (successes == 0).float()
    all_pass = (successes == data.trials).float()
    return {"success_rate": solved / trials_per_step,
            "effective_ratio": mean_over_step(1.0 - all_fail - all_pass),
            "share_all_fail": mean_over_step(all_fail),
            "share_all_pass": mean_over_step(all_pass)}


def simulate_replay(result: FitResult, num_draws: int = 50, seed: int = 0) -> Tensor:
    """Outcomes (S, n) of the fitted simulator replaying the trace's selection (same prompts and
    trials per step, the same groups trained), competence driven by its own simulated outcomes,
    for the first `num_draws` posterior draws."""
    data = result.data
    draws = {name: value[:num_draws] for name, value in result.draws.items()}
    generator = torch.Generator().manual_seed(seed)
    difficulty = result.prompt_difficulties(num_draws, seed)  # (S, P)
    theta = torch.zeros(num_draws, data.num_clusters)
    out = torch.zeros(num_draws, len(data.step))
    cluster_of_group = data.prompt_cluster[data.prompt]
    lr, tau, f = (draws[n][:, None] for n in ("learning_rate", "transfer", "forgetting"))
    for t in range(data.num_steps):
        rows = torch.nonzero(data.step == t).squeeze(1)
        c = cluster_of_group[rows]
        p = draws["ceiling"][:, None] * torch.sigmoid(theta[:, c] - difficulty[:, data.prompt[rows]])
        k = data.trials[rows]
        s = torch.binomial(k.expand_as(p).contiguous(), p, generator=generator)
        out[:, rows] = s
        rate = s / k
        g_rows = (rate * (1 - rate)).clamp_min(0).sqrt() * data.trained[rows]
        g = torch.zeros(num_draws, data.num_clusters).index_add(1, c, g_rows) / max(int(data.trained[rows].sum()), 1)
        theta = theta - f * (g == 0) * theta + lr * (g + tau * g.mean(1, keepdim=True))
    return out


def predictive_check(result: FitResult, num_draws: int = 50, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(per-step table of observed statistic vs the replay's median and 90% band, verdict)."""
    data = result.data
    observed = replay_statistics(data, data.successes)
    replayed = replay_statistics(data, simulate_replay(result, num_draws, seed))
    table = {"step": data.steps}
    verdict: dict[str, Any] = {}
    for name in CHECKED_STATISTICS:
        q = torch.quantile(replayed[name].double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0)
        obs = observed[name].double()
        outside = (obs < q[0] - 1e-12) | (obs > q[2] + 1e-12)
        table |= {f"{name}": obs.numpy(), f"{name}_q05": q[0].numpy(), f"{name}_median": q[1].numpy(),
                  f"{name}_q95": q[2].numpy()}
        share = float(outside.double().mean())
        verdict[name] = {"share_outside_90": share, "flagged": share > MISFIT_SHARE}
    verdict["misfit"] = any(v["flagged"] for k, v in verdict.items() if isinstance(v, dict))
    return pd.DataFrame(table), verdict


# -- the simulator config the fit implies -----------------------------------------------------------
def simulator_config(result: FitResult, *, num_prompts: int | None = None, name: str = "fitted-sim",
                     command: str = "") -> dict[str, Any]:
    """A config `mpts run` / `mpts ablate` accept: the simulator at the posterior means, with the
    trace's run settings where the trace is an mpts run folder."""
    data = result.data
    mean = {n: float(result.draws[n].mean()) for n in GLOBAL_SITES if n in result.draws}
    groups_per_step = np.bincount(data.step.numpy())
    run = data.run_config
    env = run.get("env") if isinstance(run.get("env"), dict) else {}
    config: dict[str, Any] = {
        "name": name,
        "seed": int(run.get("seed", 0)),
        "steps": int(run.get("steps", data.num_steps)),
        "batch_size": int(run.get("batch_size", int(np.median(groups_per_step)))),
        "candidate_ratio": int(run.get("candidate_ratio", 8)),
        "k": int(run.get("k", int(data.trials.median()))),
        "target_accuracy": float(run.get("target_accuracy", 0.6)),
        "eval_every": int(run.get("eval_every", 1)),
        "env": {"name": "sim",
                "num_prompts": int(num_prompts or env.get("num_prompts") or len(data.prompt_ids)),
                "num_clusters": data.num_clusters,
                "cluster_difficulties": [round(float(x), 4) for x in result.cluster_difficulties().mean(0)],
                "difficulty_std": round(mean["difficulty_std"], 4),
                "slope": 1.0,
                "initial_competence": 0.0,
                "learning_rate": round(mean["learning_rate"], 4),
                "transfer": round(mean["transfer"], 4),
                "forgetting": round(mean["forgetting"], 4),
                "ceiling": round(mean["ceiling"], 4)},
    }
    for section in ("predictor", "acquisition", "ablation"):
        if section in run:
            config[section] = run[section]
    return config


def write_outputs(result: FitResult, check: pd.DataFrame, verdict: dict[str, Any], config: dict[str, Any],
                  out: Path, command: str) -> list[Path]:
    """sim.yaml (config with a header naming the command), and beside it <stem>.fit.json
    (parameters, timings, verdict) and <stem>.check.csv (the per-step predictive check)."""
    from mpts.training.run_dir import write_json

    header = (f"# written by: {command}\n# fitted to: {result.data.source}\n"
              f"# slope and initial competence are fixed by convention (not identified): logit units\n")
    out.write_text(header + yaml.safe_dump(config, sort_keys=False))
    fit_json = out.with_suffix(".fit.json")
    write_json(fit_json, {"command": command, "trace": result.data.source, "seconds": result.seconds,
                          "groups": len(result.data.step), "steps": result.data.num_steps,
                          "prompts": len(result.data.prompt_ids), "clusters": result.data.num_clusters,
                          # cluster_difficulties[c] in sim.yaml is the cluster labelled cluster_labels[c]
                          "cluster_labels": list(result.data.cluster_labels),
                          "inference": "MAP (SVI, AutoLaplaceApproximation) + Laplace; prompt difficulties "
                                       "integrated out on a grid",
                          "final_elbo": -result.elbo[-1],
                          "parameters": result.parameters().to_dict(orient="records"),
                          "predictive_check": verdict})
    check_csv = out.with_suffix(".check.csv")
    check.to_csv(check_csv, index=False)
    return [out, fit_json, check_csv]


# -- reading what `mpts fit-sim` is given ------------------------------------------------------------
def read_fit_input(path: Path, clusters_file: Path | None = None, use_levels: bool = True) -> FitData:
    """FitData from an mpts run folder (its trace, config and clusters: the simulator's own, or the
    pool's difficulty levels where the run wrote them), or from anything `mpts replay` reads (a
    trace table, a per-rollout table, a verl dump). `clusters_file` overrides either; `use_levels`
    False fits a run folder's trace as one cluster even where it has levels."""
    from mpts.training.logs import read_log

    path = Path(path)
    run_config: dict[str, Any] = {}
    clusters: dict[str, Any] | None = None
    if path.is_dir() and (path / "config.yaml").is_file():
        trace, run_config = _read_run_folder(path)
        clusters = _simulator_clusters(run_config)
        if clusters is None and clusters_file is None and use_levels:
            clusters = _level_clusters(path)
    else:
        trace, _ = read_log(path)
    if clusters_file is not None:
        clusters = _read_clusters(clusters_file)
    trace = trace.assign(prompt_id=trace["prompt_id"].astype(str))
    return fit_data(trace, clusters, source=str(path), run_config=run_config)


def _read_run_folder(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    from mpts.training.run_dir import RunFolder

    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.yaml'} must hold a mapping")
    if (path / "trace.parquet").is_file():
        trace = pd.read_parquet(path / "trace.parquet")
    else:
        trace = RunFolder(path).read_parts("trace")
    if trace.empty:
        raise ValueError(f"{path}: the run folder has no trace rows yet")
    return trace, config


def _simulator_clusters(config: dict[str, Any]) -> dict[str, int] | None:
    """The simulator's clusters by prompt id, rebuilt from the run's config (they are a function
    of its seed and options); None for other environments."""
    from mpts.training.config import RunConfig
    from mpts.training.loop import build_environment

    env = config.get("env") or {}
    if (env.get("name") if isinstance(env, dict) else env) != "sim":
        return None
    world = build_environment(RunConfig.model_validate(config), None)
    return {str(i): int(c) for i, c in enumerate(world.pool.clusters.tolist())}


def _level_clusters(run_dir: Path) -> dict[str, int] | None:
    """Each pool prompt's difficulty level as its cluster (`prompt_levels.json`, written by an
    environment with levels, e.g. the LM tasks); None when the run folder has none."""
    from mpts.reports.levels import read_levels

    levels = read_levels(run_dir)
    return None if levels is None else {str(i): int(level) for i, level in enumerate(levels.tolist())}


def _read_clusters(path: Path) -> dict[str, Any]:
    frame = pd.read_csv(path, dtype={"prompt_id": str}) if Path(path).suffix.lower() == ".csv" \
        else pd.read_parquet(path)
    if not {"prompt_id", "cluster"} <= set(frame.columns):
        raise ValueError(f"{path}: a clusters table needs columns prompt_id and cluster")
    return dict(zip(frame["prompt_id"].astype(str), frame["cluster"].astype(str)))
