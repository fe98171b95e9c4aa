"""`mpts` command line: run, ablate, replay, bench, report, configs.

Every command takes `--set key=value` (repeatable) overrides. Errors in user input (configs,
traces, names) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from mpts.training.threads import DEFAULT_PREDICTOR_THREADS
from rich.table import Table

from mpts.models.extras import MissingExtraError

console = Console()


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set predictor.decay=0.8 (repeatable)")


class OneLineParser(argparse.ArgumentParser):
    """Flag errors as one line (`error: ...`, exit 2) like every other user error; --help still has the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    from mpts.training.config import cli_number

    count = cli_number(int, ge=1, le=10**9)
    parser = OneLineParser(prog="mpts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run one configuration")
    run.add_argument("config", nargs="?", help="a named config (mpts configs) or a YAML file")
    run.add_argument("--out", type=Path, help="run folder (default runs/<name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    run.add_argument("--rollback-to", type=cli_number(int, ge=0, le=10**9), metavar="STEP",
                     help="with --resume: redo steps STEP onward from the newest checkpoint before STEP "
                          "(rows after it are moved to parts/.orphaned/, never deleted)")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="with --resume: a plugin module the run's config.yaml names and you trust (repeatable); "
                          "importing it runs its code")
    run.add_argument("--model", help="local model directory for the LM environment (= --set env.model=...)")
    _add_set(run)

    ablate = sub.add_parser("ablate", help="arms (predictor, rule) x grid of config values x seeds")
    ablate.add_argument("config")
    ablate.add_argument("--out", type=Path)
    ablate.add_argument("--workers", type=cli_number(int, ge=1, le=1024), help="parallel runs on this machine (default: ablation.workers)")
    ablate.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: processes on this machine; ray: tasks on a Ray cluster")
    ablate.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    ablate.add_argument("--model", help="local model directory for the LM environment")
    _add_set(ablate)

    replay = sub.add_parser("replay", help="score a predictor prequentially on a logged trace")
    replay.add_argument("trace", type=Path, help="parquet, CSV or JSONL with step, prompt_id, successes, trials; "
                        "a per-rollout table with a `prompt` column; or a verl rollout dump folder")
    replay.add_argument("--success-threshold", type=cli_number(float), default=None, metavar="R",
                        help="per-rollout logs: a rollout succeeds when its reward >= R (default 1.0)")
    replay.add_argument("--reward-column", help="per-rollout logs: the reward field (default: score, reward, acc, ...)")
    replay.add_argument("--prompt-info", type=Path, metavar="FILE",
                        help="table keyed by prompt_id or prompt with `cluster` and/or `embedding` columns")
    replay.add_argument("--predictor", required=True)
    replay.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="a module to import first, e.g. one that registers --predictor (repeatable); "
                             "importing it runs its code")
    replay.add_argument("--out", type=Path, help="also write the scores to this JSON file (default: print only)")
    replay.add_argument("--seed", type=cli_number(int, ge=0, le=2**32 - 1), default=0)
    _add_set(replay)

    bench = sub.add_parser("bench", help="time predict+select+observe per step at scale")
    bench.add_argument("--predictor", default="beta")
    bench.add_argument("--rule", default="thompson_target")
    bench.add_argument("--pool", type=count, default=1_000_000)
    bench.add_argument("--candidates", type=count, default=4096)
    bench.add_argument("--batch", type=count, default=256)
    bench.add_argument("--k", type=cli_number(int, ge=1, le=2**16), default=8)
    bench.add_argument("--steps", type=count, default=50)
    bench.add_argument("--threads", type=cli_number(int, ge=0, le=1024), default=DEFAULT_PREDICTOR_THREADS,
                       help="intra-op threads for the timed calls (default %(default)s, as runs use; 0: torch's default)")
    bench.add_argument("--background-load", type=cli_number(int, ge=0, le=1024), default=0, metavar="N",
                       help="also time it with N busy processes alongside and report the slowdown against the "
                            "quiet run of the same invocation")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    _add_set(bench)

    report = sub.add_parser("report", help="calibration and efficiency report over run or ablation folders")
    report.add_argument("runs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--target-accuracy", type=cli_number(float, gt=0.0, le=1.0))
    report.add_argument("--window", type=count, help="steps per window for calibration over time")
    _add_set(report)

    fit_sim = sub.add_parser("fit-sim", help="fit the simulated learner to a trace and check the fit against it")
    fit_sim.add_argument("trace", type=Path, help="an mpts run folder, or anything `mpts replay` reads")
    fit_sim.add_argument("--out", type=Path, default=Path("fitted-sim.yaml"),
                         help="simulator config to write (never overwritten); <stem>.fit.json and "
                              "<stem>.check.csv beside it (default %(default)s)")
    fit_sim.add_argument("--clusters", type=Path, metavar="FILE",
                         help="CSV or parquet with prompt_id, cluster (default: the simulator's own, or one cluster)")
    fit_sim.add_argument("--num-prompts", type=count, help="pool size of the fitted simulator (default: prompts seen)")
    fit_sim.add_argument("--max-iterations", type=count, default=200,
                         help="L-BFGS iterations to the posterior mode (default %(default)s)")
    fit_sim.add_argument("--seed", type=cli_number(int, ge=0, le=2**32 - 1), default=0)

    sub.add_parser("configs", help="list the named configurations")
    return parser


def _overrides(args) -> list[str]:
    extra = [f"env.model={args.model}"] if getattr(args, "model", None) else []
    return list(args.overrides) + extra


def _default_out(name: str, prefix: str = "") -> Path:
    """runs/<prefix><name>-<time>; a name that is a path (a separator, absolute) would leave runs/."""
    folder = f"{prefix}{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if Path(folder).name != folder or any(sep in name for sep in ("/", "\\")):
        raise ValueError(f"config name {name!r} is a path, not a name, so the default run folder would lie "
                         "outside runs/; set name to a plain name (no / or ..) or give --out")
    return Path("runs") / folder


def cmd_run(args) -> int:
    from mpts.training.config import load_config
    from mpts.training.loop import run

    if args.resume is not None:
        if args.overrides or args.model or args.config:
            raise ValueError("--resume continues a run with its saved config; drop CONFIG, --set and --model")
        out, config, resume = args.resume, None, True
    elif args.rollback_to is not None or args.plugin:
        raise ValueError("--rollback-to and --plugin go with --resume RUN_DIR (a new run's config names its plugins)")
    else:
        if not args.config:
            raise ValueError("give a CONFIG (see `mpts configs`) or --resume RUN_DIR")
        config = load_config(args.config, _overrides(args))
        out, resume = args.out or _default_out(config.name), False

    from rich.progress import Progress
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("steps", total=None)

        def progress(done, total, metrics):
            bar.update(task, completed=done, total=total,
                       description=f"step {done}/{total} eval {metrics['eval_accuracy']:.3f}")

        summary = run(config, out, resume=resume, rollback_to=args.rollback_to, progress=progress,
                      trusted_plugins=args.plugin)
    _print_summary(summary)
    console.print(f"run folder: {out}")
    return 0


def _print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['predictor']} + {summary['acquisition']} (seed {summary['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4g}")
    console.print(table)


def cmd_ablate(args) -> int:
    from mpts.training.ablate import RunsFailed, ablate, format_table
    from mpts.training.config import load_config

    config = load_config(args.config, _overrides(args))
    out = args.out or _default_out(config.name, "ablate-")
    try:
        table = ablate(config, out, workers=args.workers, executor=args.executor, address=args.address)
    except RunsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"\n{config.name}: mean ± 95% CI over seeds {list(config.ablation.seeds)}\n")
    print(format_table(table))
    console.print(f"ablation folder: {out}")
    return 0


def cmd_replay(args) -> int:
    from mpts.training.config import apply_overrides, import_plugins
    from mpts.training.logs import DEFAULT_SUCCESS_THRESHOLD, is_plain_trace, read_log, replay_pool
    from mpts.reports.output_paths import REPLAY_MARKER, check_scores_file
    from mpts.training.replay import replay
    from mpts.training.replay_stream import replay_file
    from mpts.training.run_dir import to_json, write_json

    options = apply_overrides({}, [o.removeprefix("predictor.") for o in args.overrides])
    import_plugins(args.plugin)
    if args.out is not None:  # before reading anything: the scores never replace an input or a run's file
        check_scores_file(args.out, [args.trace] + ([args.prompt_info] if args.prompt_info else []))
    threshold = DEFAULT_SUCCESS_THRESHOLD if args.success_threshold is None else args.success_threshold
    if args.prompt_info is None and is_plain_trace(args.trace):  # streamed: memory grows with prompts, not rows
        scores = replay_file(args.trace, args.predictor, options, seed=args.seed)
    else:
        trace, texts = read_log(args.trace, success_threshold=threshold, reward_column=args.reward_column)
        pool = replay_pool(trace, texts, args.prompt_info)
        scores, _ = replay(trace, args.predictor, options, seed=args.seed, pool=pool)
    scores = {**REPLAY_MARKER, **scores}  # marks the file as ours, so a later replay may replace it
    print(to_json(scores, indent=2))
    if args.out is not None:
        write_json(args.out, scores)
        console.print(f"scores written to {args.out}")
    return 0


def cmd_bench(args) -> int:
    from mpts.training.bench import bench, bench_under_load
    from mpts.training.config import apply_overrides

    options = apply_overrides({}, [o.removeprefix("predictor.") for o in args.overrides])
    settings = dict(predictor=args.predictor, pool=args.pool, candidates=args.candidates, batch=args.batch, k=args.k,
                    steps=args.steps, rule=args.rule, options=options, threads=args.threads or None)
    result = bench_under_load(args.background_load, **settings) if args.background_load else bench(**settings)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            console.print(f"{key:>28}: {value}")
    return 0


def cmd_report(args) -> int:
    from mpts.reports import export_report

    if args.overrides:
        raise ValueError("report takes no --set overrides; use --target-accuracy / --window")
    summary = export_report(args.runs, args.out, target_accuracy=args.target_accuracy, window_steps=args.window)
    console.print(f"report: {args.out / 'report.html'} ({len(summary.get('groups', []))} groups)")
    return 0


def cmd_fit_sim(args) -> int:
    from mpts.training.fit_sim import fit, predictive_check, read_fit_input, simulator_config, write_outputs

    outputs = [args.out, args.out.with_suffix(".fit.json"), args.out.with_suffix(".check.csv")]
    taken = [p for p in outputs if p.exists() or p.is_symlink()]
    if taken:
        raise ValueError(f"--out: {taken[0]} exists; fit-sim never overwrites a file, name a new one")
    if args.trace.is_dir() and args.out.resolve().is_relative_to(args.trace.resolve()):
        raise ValueError(f"--out {args.out} is inside the trace folder {args.trace}; write it elsewhere")
    data = read_fit_input(args.trace, args.clusters)
    result = fit(data, max_iterations=args.max_iterations, seed=args.seed)
    check, verdict = predictive_check(result, seed=args.seed)
    command = "mpts fit-sim " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["fit-sim"] else f"mpts fit-sim {args.trace}"
    config = simulator_config(result, num_prompts=args.num_prompts, name=args.out.stem)
    written = write_outputs(result, check, verdict, config, args.out, command)
    table = Table(title=f"fitted to {args.trace} ({len(data.step)} groups, {data.num_steps} steps, "
                        f"{result.seconds:.1f} s)")
    for column in ("parameter", "mean", "q05", "q95", "identified"):
        table.add_column(column, justify="left" if column in ("parameter", "identified") else "right")
    for row in result.parameters().itertuples():
        table.add_row(row.parameter, f"{row.mean:.3f}", f"{row.q05:.3f}", f"{row.q95:.3f}", row.identified)
    console.print(table)
    for name, value in verdict.items():
        if isinstance(value, dict):
            console.print(f"predictive check {name}: {value['share_outside_90']:.0%} of steps outside the 90% band"
                          + ("  MISFIT" if value["flagged"] else ""))
    console.print("the fit " + ("does NOT reproduce the trace (see the .check.csv)" if verdict["misfit"]
                                else "reproduces the trace's per-step statistics"))
    console.print("written: " + ", ".join(str(p) for p in written))
    return 0


def cmd_configs(args) -> int:
    from mpts.training.config import named_configs

    for name in named_configs():
        print(name)
    return 0


COMMANDS = {"run": cmd_run, "ablate": cmd_ablate, "replay": cmd_replay, "bench": cmd_bench,
            "report": cmd_report, "fit-sim": cmd_fit_sim, "configs": cmd_configs}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, KeyError, OSError, IndexError, MissingExtraError) as error:  # user input; a bug still shows its traceback
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    from pydantic import ValidationError

    from mpts.training.config import format_errors

    if isinstance(error, ValidationError):
        message = format_errors(error)
    elif isinstance(error, OSError):  # args[0] of an OSError is its errno: say what it means
        where = error.filename if error.filename is not None else "a file operation"
        number = error.errno if error.errno is not None else (error.args[0] if error.args else None)
        meaning = error.strerror or (os.strerror(number) if isinstance(number, int) else str(error))
        message = f"{where}: {meaning}"
    elif isinstance(error, UnicodeError):  # args[0] is only the codec's name ('utf-8')
        message = f"input is not valid text ({error})"
    elif isinstance(error, KeyError):  # str() of a KeyError adds quotes
        message = str(error.args[0]) if error.args else repr(error)
    else:
        message = str(error) or repr(error)
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
