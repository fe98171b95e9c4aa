"""ArviZ export of the final posterior over p for the sampled prompts of each run.

The loop writes posterior_draws.parquet (prompt_id, draw, p, true_p) at the end of a run. All runs
of one group go into one InferenceData with a single chain: the `prompt` dimension enumerates
(seed, prompt_id) pairs, labelled like "s0/p12" (seed 0, prompt 12), with `seed` and `prompt_id` as
coordinates along it; the true success rates (simulator) go into constant_data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mpts.models.extras import import_extra

from .runs import Run


def _arviz():
    with warnings.catch_warnings():  # ArviZ 0.2x announces its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        return import_extra("arviz", "reports")


def draws_matrix(draws: pd.DataFrame, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt ids [m], draws of p [n_draws, m], true p [m] or NaN) from the long table."""
    ordered = draws.sort_values(["prompt_id", "draw"], kind="stable")
    ids, counts = np.unique(ordered["prompt_id"].to_numpy(np.int64), return_counts=True)
    if ids.size == 0:
        raise ValueError(f"{where} has no rows")
    if (counts != counts[0]).any():
        raise ValueError(f"{where}: every prompt needs the same number of draws (found {sorted(set(counts))})")
    p = ordered["p"].to_numpy(np.float64, na_value=np.nan).reshape(ids.size, counts[0]).T
    truth = ordered["true_p"].to_numpy(np.float64, na_value=np.nan).reshape(ids.size, counts[0])[:, 0]
    return ids, p, truth


def group_inference_data(runs: Sequence[Run]):
    """One InferenceData for the runs (of one group) that saved posterior draws, or None."""
    parts = [(run.seed, *draws_matrix(run.draws, run.path / "posterior_draws.parquet"))
             for run in runs if run.draws is not None]
    if not parts:
        return None
    n_draws = min(p.shape[0] for _, _, p, _ in parts)
    seeds = np.concatenate([np.full(ids.size, seed, dtype=np.int64) for seed, ids, _, _ in parts])
    ids = np.concatenate([ids for _, ids, _, _ in parts])
    p = np.concatenate([p[:n_draws] for _, _, p, _ in parts], axis=1)
    truth = np.concatenate([truth for _, _, _, truth in parts])
    labels = [f"s{s}/p{i}" for s, i in zip(seeds, ids)]
    az = _arviz()
    data = az.from_dict(
        posterior={"p": p[None]},  # one chain
        constant_data={"true_p": truth},
        coords={"prompt": labels},
        dims={"p": ["prompt"], "true_p": ["prompt"]},
        attrs={"source": "mpts posterior_draws.parquet", "runs": ", ".join(str(r.path) for r in runs)},
    )
    extra = {"seed": ("prompt", seeds), "prompt_id": ("prompt", ids)}
    data.posterior = data.posterior.assign_coords(extra)
    data.constant_data = data.constant_data.assign_coords(extra)
    return data


def posterior_summary(data) -> pd.DataFrame:
    """ArviZ's summary statistics of p (mean, sd, 90% HDI), with the true p alongside.

    The diagnostics half of the summary (r_hat, ESS, MCSE) needs two or more MCMC chains; these
    draws are one chain of independent samples from the fitted posterior, so it is not asked for.
    """
    az = _arviz()
    table = az.summary(data, var_names=["p"], kind="stats", hdi_prob=0.9)
    table["true_p"] = data.constant_data["true_p"].to_numpy()
    return table


def write_netcdf(data, path: Path) -> Path:
    data.to_netcdf(str(path), engine="h5netcdf")
    return path
