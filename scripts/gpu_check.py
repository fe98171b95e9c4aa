"""One-command GRPO check on one GPU: `make gpu-check` (or `python scripts/gpu_check.py`).

1. Imports what the loop needs; anything missing is installed from local wheels in `.whl/`
   (`pip install --no-index --find-links .whl`), nothing is downloaded.
2. Makes `mpts` importable from this checkout without installing it (a temporary package of links).
3. Runs the named config `lm_gpu_check` (HF generate rollouts, a from-config model, GRPO) into a
   run folder and writes `timing.json` there: seconds per step by phase (rollout, train,
   predictor = predict + select + observe, eval) and the whole run.

`--device cpu` is the dry run (a few steps, a tiny model, a small pool) that CI runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name -> distribution name, for what the loop and the LM environment import
REQUIRED = {"numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "pyarrow": "pyarrow", "yaml": "pyyaml",
            "pydantic": "pydantic", "pyro": "pyro-ppl", "transformers": "transformers",
            "safetensors": "safetensors", "rich": "rich"}
PACKAGES = {"models": "mpts.models", "inference": "mpts.inference", "training": "mpts.training",
            "reports": "mpts.reports"}
# one-digit sums after a short warm-up: some groups are informative, so the dry run trains too
CPU_DRY_RUN = ["steps=3", "batch_size=8", "k=4", "eval_every=2", "checkpoint_every=2",
               "posterior_draws_prompts=8", "env.num_prompts=64", "env.eval_prompts=16", "env.eval_samples=2",
               'env.task_options={"min_digits": 1, "max_digits": 1, "operators": ["+"]}',
               "env.warmup_sft_steps=150", "env.warmup_sft_batch=32", "env.warmup_sft_lr=3.0e-3",
               "env.warmup_sft_problems=64",
               "env.device=cpu", "env.dtype=float32", "env.grpo.micro_batch_size=64", "env.generation_batch=64",
               'env.tiny={"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, '
               '"intermediate_size": 128}']


def missing_modules() -> list[str]:
    missing = []
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def install_missing(wheels: Path) -> None:
    missing = missing_modules()
    if not missing:
        return
    names = [REQUIRED[m] for m in missing]
    if not wheels.is_dir():
        sys.exit(f"gpu-check: missing {', '.join(names)} and no wheel folder {wheels}; fill it elsewhere with "
                 f"`pip download --only-binary=:all: --python-version {sys.version_info.major}."
                 f"{sys.version_info.minor} -d {wheels.name} {' '.join(names)}` and copy it here")
    print(f"gpu-check: installing {', '.join(names)} from {wheels}", flush=True)
    # no torch upgrade: the machine's CUDA torch stays as it is
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    *names], check=True)
    importlib.invalidate_caches()
    still = missing_modules()
    if still:
        sys.exit(f"gpu-check: still missing after installing from {wheels}: {', '.join(still)}")


def make_mpts_importable() -> None:
    """An installed mpts wins; otherwise a temporary `mpts` package whose subpackages link to this checkout."""
    try:
        import mpts.training.loop  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="mpts-shim-")) / "mpts"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    for folder in PACKAGES:
        (shim / folder).symlink_to(ROOT / folder, target_is_directory=True)
    sys.path.insert(0, str(shim.parent))


def timing(metrics, total_seconds: float) -> dict[str, float]:
    """Mean seconds per step by phase (evaluations amortised over the steps), and totals."""
    phases = {"rollout": ["rollout_seconds"], "train": ["train_seconds"],
              "predictor": ["predict_seconds", "select_seconds", "observe_seconds"], "eval": ["eval_seconds"]}
    out = {f"{name}_seconds_per_step": float(metrics[[c for c in columns if c in metrics]].sum(axis=1).mean())
           for name, columns in phases.items()}
    evals = metrics["eval_seconds"][metrics["eval_accuracy"].notna()]
    out["eval_seconds_per_evaluation"] = float(evals.median()) if len(evals) else float("nan")
    for extra in ("generate_seconds", "greedy_probe_seconds", "reward_seconds", "sync_seconds"):
        if extra in metrics:
            out[f"{extra.removesuffix('_seconds')}_seconds_per_step"] = float(metrics[extra].mean())
    out["steps"] = int(len(metrics))
    out["loop_seconds"] = float(metrics["wall_seconds"].iloc[-1])
    out["total_seconds"] = total_seconds  # including the model build, the warm-up and the first evaluation
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the few-step dry run")
    parser.add_argument("--out", type=Path, help="run folder (default runs/gpu-check-<device>-<time>)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="local wheels for missing packages")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    install_missing(args.wheels)
    make_mpts_importable()
    import pandas as pd
    import torch

    from mpts.training.config import load_config
    from mpts.training.loop import run

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device is visible to torch (run with --device cpu for the dry run)")
    overrides = (CPU_DRY_RUN if args.device == "cpu" else []) + args.overrides
    config = load_config("lm_gpu_check", overrides)
    out = args.out or ROOT / "runs" / f"gpu-check-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.device == "cuda":
        print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    summary = run(config, out)
    metrics = pd.read_parquet(out / "metrics.parquet")
    figures = timing(metrics, time.perf_counter() - start)
    figures.update(device=args.device, informative_groups_trained=float(metrics["train_informative_groups"].sum())
                   if "train_informative_groups" in metrics else 0.0,
                   initial_eval_accuracy=summary["initial_eval_accuracy"],
                   final_eval_accuracy=summary["final_eval_accuracy"])
    (out / "timing.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"gpu-check: run folder {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
