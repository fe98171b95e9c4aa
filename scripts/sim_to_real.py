"""Does the simulator predict a real ablation? Fit it to each seed's real uniform run, run the
fitted simulator's ablation (same arms, grid, seed), and set its answers beside the real ones.

    python scripts/sim_to_real.py --real reports/results/lm_tiny/summary.json \
        --uniform runs/lm_tiny-ablation/runs/beta__uniform__seed{0,1,2,3} --out reports/results/sim-to-real/lm_tiny

`--real` is the `summary.json` that `mpts report` wrote for the real ablation (per-run rollouts to
target, effective ratio, final accuracy); `--uniform` are that ablation's uniform-arm run folders,
one per seed (the fit sees only them). Where the report was made with `--target-accuracy`, the
simulated ablations use that target too. Writes, under --out: per seed the fitted config, its
parameters and predictive check (`seed<N>/sim.yaml`, `.fit.json`, `.check.csv`) and the fitted
simulator's ablation (`seed<N>/ablation/`); and `comparison.md` / `comparison.json`.

The fit is over the pool's difficulty levels where a run folder has them (`prompt_levels.json`).
`--recompute-levels` gives LM run folders older than that file their levels back, recomputed from
the run's task, pool size and seed (`seed<N>/recomputed-levels.csv`); `--one-cluster` ignores levels.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from mpts.reports.stats import mean_interval, paired_ratio
from mpts.training.ablate import ablate
from mpts.training.config import validate_config
from mpts.training.fit_sim import fit, predictive_check, read_fit_input, simulator_config, write_outputs

MEASURES = ("rollouts_to_target", "mean_effective_ratio", "final_eval_accuracy")


def arm_of(run_name: str) -> str:
    return re.sub(r"__seed\d+$", "", run_name)


def real_runs(path: Path) -> pd.DataFrame:
    summary = json.loads(path.read_text())
    return pd.DataFrame([{"arm": arm_of(r["run"]), "seed": int(r["seed"]), **{m: r.get(m) for m in MEASURES}}
                         for r in summary["runs"]])


def simulated_runs(ablation: Path, seed: int) -> pd.DataFrame:
    frame = pd.read_parquet(ablation / "runs.parquet")
    return pd.DataFrame({"arm": frame["run"].map(arm_of), "seed": seed,
                         **{m: frame[m].astype(float).where(frame[m].notna(), None) for m in MEASURES}})


def recomputed_levels(run: Path, into: Path) -> Path | None:
    """For an LM run folder older than `prompt_levels.json`: its pool's levels recomputed from the
    run's task, pool size and seed (the same split the environment makes), written as a clusters
    table `into`; None when the folder has its levels file or is not an LM run."""
    import yaml

    from mpts.inference.schema import LEVELS_FILE
    from mpts.training.environments.lm.env import LMOptions, split_problems
    from mpts.training.environments.lm.tasks import get_task

    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    env = config.get("env") if isinstance(config.get("env"), dict) else {}
    if (run / LEVELS_FILE).is_file() or env.get("name") != "lm":
        return None
    task = get_task(env.get("task", "arithmetic"), env.get("task_options"))
    size = {n: int(env.get(n, LMOptions.model_fields[n].default)) for n in ("num_prompts", "eval_prompts")}
    pool, _ = split_problems(task, size["num_prompts"], size["eval_prompts"], int(config.get("seed", 0)))
    pd.DataFrame({"prompt_id": range(len(pool)), "cluster": [p.difficulty for p in pool]}).to_csv(into, index=False)
    return into


def fit_and_simulate(uniform: Path, out: Path, workers: int, recompute_levels: bool = False,
                     use_levels: bool = True, target_accuracy: float | None = None) -> tuple[int, dict]:
    """`target_accuracy`: the real report's target where it overrode the runs' own (`mpts report
    --target-accuracy`), so real and simulated rollouts to target are to the same accuracy."""
    staged = out / f".levels-{uniform.name}.csv"
    clusters = recomputed_levels(uniform, staged) if recompute_levels else None
    data = read_fit_input(uniform, clusters, use_levels=use_levels)
    seed = int(data.run_config.get("seed", 0))
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=False)  # never over an earlier result
    if clusters is not None:
        clusters.rename(folder / "recomputed-levels.csv")
    result = fit(data, seed=seed)
    check, verdict = predictive_check(result, seed=seed)
    config = simulator_config(result, name=f"sim-of-{data.run_config.get('name', 'run')}-seed{seed}")
    config["ablation"] = {**config.get("ablation", {}), "seeds": [seed], "workers": workers}
    if target_accuracy is not None:
        config["target_accuracy"] = float(target_accuracy)
    write_outputs(result, check, verdict, config, folder / "sim.yaml", f"mpts fit-sim {uniform}")
    ablate(validate_config(config), folder / "ablation", workers=workers, show_progress=False)
    fitted = {"seconds": result.seconds, "parameters": result.parameters().to_dict(orient="records"),
              "predictive_check": verdict}
    return seed, fitted


def compare(real: pd.DataFrame, simulated: pd.DataFrame, reference: str) -> list[dict]:
    rows = []
    for arm in sorted(set(simulated["arm"])):
        row = {"arm": arm}
        for source, frame in (("real", real), ("sim", simulated)):
            mine = frame[frame["arm"] == arm].set_index("seed")
            base = frame[frame["arm"] == reference].set_index("seed")
            seeds = sorted(set(simulated.loc[simulated["arm"] == arm, "seed"]))
            mine, base = mine.reindex(seeds), base.reindex(seeds)
            row[f"{source}_rollouts_ratio"] = paired_ratio(mine["rollouts_to_target"].to_dict(),
                                                           base["rollouts_to_target"].to_dict()).as_dict()
            row[f"{source}_effective_ratio"] = mean_interval(list(mine["mean_effective_ratio"])).as_dict()
            row[f"{source}_final_accuracy"] = mean_interval(list(mine["final_eval_accuracy"])).as_dict()
        rows.append(row)
    return rows


def cell(estimate: dict, digits: int = 2) -> str:
    if estimate["mean"] is None:
        return f"— (0/{estimate['total']})"
    text = f"{estimate['mean']:.{digits}f} [{estimate['lo']:.{digits}f}, {estimate['hi']:.{digits}f}]"
    return text + (f" ({estimate['n']}/{estimate['total']})" if estimate["n"] < estimate["total"] else "")


def markdown(rows: list[dict], reference: str) -> str:
    lines = [f"| arm | rollouts to target / {reference}: real | sim | effective ratio: real | sim "
             "| final accuracy: real | sim |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join([row["arm"]] + [cell(row[f"{s}_{m}"]) for m in
                                                        ("rollouts_ratio", "effective_ratio", "final_accuracy")
                                                        for s in ("real", "sim")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="the real ablation's report summary.json")
    parser.add_argument("--uniform", type=Path, nargs="+", required=True, help="its uniform-arm run folders")
    parser.add_argument("--reference", default="beta__uniform", help="the arm ratios are taken to")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--recompute-levels", action="store_true",
                        help="for LM run folders without prompt_levels.json, recompute the pool's levels from "
                             "the run's task and seed and fit over them")
    levels.add_argument("--one-cluster", action="store_true",
                        help="fit every trace as one cluster, even where its run folder has levels")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fits, simulated = {}, []
    target = json.loads(args.real.read_text()).get("target_accuracy")  # null: each run's configured target
    for folder in args.uniform:
        seed, fitted = fit_and_simulate(folder, args.out, args.workers, args.recompute_levels,
                                        use_levels=not args.one_cluster, target_accuracy=target)
        fits[seed] = fitted
        simulated.append(simulated_runs(args.out / f"seed{seed}" / "ablation", seed))
    simulated = pd.concat(simulated, ignore_index=True)
    real = real_runs(args.real)
    real = real[real["seed"].isin(simulated["seed"])]
    rows = compare(real, simulated, args.reference)
    (args.out / "comparison.md").write_text(markdown(rows, args.reference))
    (args.out / "comparison.json").write_text(json.dumps({"real": str(args.real), "uniform": [str(p) for p in args.uniform],
                                                          "reference": args.reference, "arms": rows, "fits": fits},
                                                         indent=2, default=str))
    print(markdown(rows, args.reference))


if __name__ == "__main__":
    main()
