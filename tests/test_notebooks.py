"""The example notebooks run top to bottom (small settings) and show what they promise.

Each notebook is executed with nbclient in a fresh `python3` kernel (the interpreter running the
tests), from a temporary folder, with MPTS_NOTEBOOK_FAST=1 and its outputs redirected to a
temporary MPTS_NOTEBOOK_OUT. The committed files must hold no outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_write_your_own_predictor.ipynb", "03_replay.ipynb")
INTERPRETER_MARK = "kernel interpreter: "


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[nbformat.NotebookNode, Path]:
    """Run a notebook; returns it with outputs, and the folder it wrote its runs to."""
    out = tmp_path / "out"
    monkeypatch.setenv("MPTS_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPTS_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPTS_REPLAY_TRACE", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import sys; print({INTERPRETER_MARK!r} + sys.executable)"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    assert _text(notebook.cells[-1]).strip() == INTERPRETER_MARK + sys.executable
    notebook.cells.pop()
    return notebook, out


def _text(cell) -> str:
    """Everything a cell printed or displayed as text (stream, plain, markdown, html)."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        for mime in ("text/plain", "text/markdown", "text/html"):
            parts.append(output.get("data", {}).get(mime, ""))
    return "".join(parts)


def _images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def _all_text(notebook) -> str:
    return "\n".join(_text(cell) for cell in notebook.cells)


def _no_errors(notebook) -> None:
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors


def test_quickstart_runs_the_ablation_and_shows_table_and_reliability(tmp_path, monkeypatch):
    notebook, out = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    _no_errors(notebook)
    text = _all_text(notebook)
    from mpts.training.config import load_config
    arms = load_config("quickstart").ablation.arms
    for arm in arms:
        predictor = arm.predictor if isinstance(arm.predictor, str) else arm.predictor["name"]
        assert f"| {predictor} | {arm.acquisition} |" in text, f"headline table lacks {predictor} · {arm.acquisition}"
    assert _images(notebook) >= 2  # reliability diagram and accuracy curves
    root = out / "01_quickstart"
    assert len(list((root / "runs").iterdir())) == len(arms)  # one seed per arm in fast mode
    assert (out / "01_quickstart-report" / "report.html").is_file()  # beside the ablation, not inside it
    assert not (tmp_path / "cwd" / "runs").exists() and not (NOTEBOOKS / "runs").exists()


def test_own_predictor_is_registered_run_and_compared_with_beta(tmp_path, monkeypatch):
    notebook, out = execute("02_write_your_own_predictor.ipynb", tmp_path, monkeypatch)
    _no_errors(notebook)
    text = _all_text(notebook)
    assert "never rolled out: E[p] =" in text
    summary = json.loads((out / "02_write_your_own_predictor" / "report" / "summary.json").read_text())
    groups = {g["group"]: g for g in summary["groups"]}
    assert set(groups) == {"beta · uniform", "beta · thompson_target", "pooled_logit · thompson_target"}
    assert groups["pooled_logit · thompson_target"]["has_elbo"]
    assert all(len(g["seeds"]) == 2 for g in groups.values())
    for group in groups:  # the headline table shown inline names every group
        assert group in text
    assert _images(notebook) >= 2  # reliability diagram and ELBO trace


def test_own_predictor_is_at_most_25_lines_of_modelling():
    """The predictor is its model: no state, update, seed or hook plumbing in the user's code."""
    notebook = nbformat.read(NOTEBOOKS / "02_write_your_own_predictor.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code" and "class PooledLogit(ModelPredictor)" in c.source)
    lines = [line for line in cell.source.splitlines()[1:] if line.strip()]  # after %%writefile, not blank
    assert len(lines) <= 25, f"the notebook's predictor takes {len(lines)} lines"
    for plumbing in ("Rows", "SVIState", "StreamingSVI", "_state_changed", "def _observe", "def _predict", "seed",
                     "failed"):
        assert plumbing not in cell.source, f"the notebook's predictor handles {plumbing}"


def test_replay_scores_every_predictor_on_one_trace(tmp_path, monkeypatch):
    notebook, out = execute("03_replay.ipynb", tmp_path, monkeypatch)
    _no_errors(notebook)
    text = _all_text(notebook)
    assert "gp: skipped" in text
    table_cell = next(c for c in notebook.cells if c.cell_type == "code" and "replay(trace, name" in c.source)
    table = _text(table_cell)
    for name in ("beta", "hmm3", "id_vae"):
        assert f"<th>{name}</th>" in table, f"score table lacks {name}"
    assert "log_predictive_density" in table
    assert _images(notebook) >= 2  # reliability diagram and PIT histograms
    if not list((NOTEBOOKS / "data").glob("*.parquet")):  # no checked-in LM trace: a simulator run is replayed
        assert (out / "03_replay" / "simulated_run" / "trace.parquet").is_file()
        assert "spearman_true" in table  # and scored against the true success rates


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_valid_and_stripped(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} holds outputs"
        assert "attachments" not in cell or not cell.attachments


def test_every_notebook_in_the_folder_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
