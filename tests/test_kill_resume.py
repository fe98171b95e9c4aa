"""SIGKILL at random moments (subprocesses), then `mpts run --resume`: the resumed trace equals an
uninterrupted run's row by row (no row lost, duplicated or changed)."""

import pandas as pd

from kill_resume import compare_traces, kill_and_resume


def test_compare_traces_counts_lost_duplicated_and_changed_rows():
    reference = pd.DataFrame({"step": [0, 0, 1], "prompt_id": [1, 2, 1], "successes": [3, 4, 5]})
    resumed = pd.DataFrame({"step": [0, 0, 0], "prompt_id": [1, 2, 2], "successes": [3, 0, 0]})
    assert compare_traces(reference, resumed) == {"rows": 3, "lost": 1, "duplicated": 1, "changed": 1}
    assert compare_traces(reference, reference)["lost"] == 0


def test_sigkill_at_random_moments_then_resume_loses_duplicates_and_changes_nothing(tmp_path):
    figures = kill_and_resume(tmp_path, trials=3, seed=0, max_delay=1.5)
    assert figures["kills"] >= 2, figures  # the runs are long enough to be killed mid-way
    assert figures["failed_resumes"] == 0, figures
    assert figures["lost"] == figures["duplicated"] == figures["changed"] == 0, figures
    assert figures["rows"] == 3 * 300 * 16, figures
