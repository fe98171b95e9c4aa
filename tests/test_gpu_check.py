"""`make gpu-check`'s script: its CPU dry run end to end, the wheel fallback, and the import shim."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_writes_the_run_folder_and_a_timing_breakdown(tmp_path):
    gpu_check = load_script()
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    figures = json.loads((tmp_path / "run" / "timing.json").read_text())
    for phase in ("rollout", "train", "predictor", "eval"):
        assert figures[f"{phase}_seconds_per_step"] > 0, phase
    assert figures["steps"] == 3 and figures["informative_groups_trained"] > 0  # GRPO really updated
    for name in ("metrics.parquet", "trace.parquet", "summary.json", "checkpoints/latest.pt"):
        assert (tmp_path / "run" / name).exists(), name


def test_missing_packages_without_wheels_stop_with_one_line(tmp_path, monkeypatch):
    gpu_check = load_script()
    monkeypatch.setattr(gpu_check, "REQUIRED", {"no_such_module_for_mpts": "no-such-dist"})
    with pytest.raises(SystemExit, match="missing no-such-dist and no wheel folder"):
        gpu_check.install_missing(tmp_path / "absent")


def test_shim_imports_mpts_from_the_checkout_when_it_is_not_installed():
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower()
                    and 'editable' not in getattr(f, '__name__', '').lower()]
sys.path[:] = [p for p in sys.path if 'editable' not in p]
import importlib.util
try:
    import mpts.training.diagnostics
    print('installed')
except ImportError:
    spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    module.make_mpts_importable()
    import mpts.training.diagnostics
    print('shim', mpts.training.diagnostics.__file__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if out.startswith("installed"):
        pytest.skip("mpts is installed in a way this test cannot hide")
    assert out.startswith("shim") and "mpts-shim-" in out
