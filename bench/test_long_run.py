"""bench/long_run.py: a run stopped and resumed trains and measures what a run straight through does."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import long_run  # noqa: E402

from supsup_fast.testing import torch_threads  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # restored after: the bench session's machine_info reads the count at the end
        yield


def test_a_resumed_long_run_equals_one_that_ran_through(tmp_path):
    common = ["--tasks", "3", "--iterations", "8", "--eval-images", "10"]
    assert long_run.main([*common, "--out", str(tmp_path / "through")]) == 0
    assert long_run.main([*common, "--stop-after", "2", "--out", str(tmp_path / "resumed")]) == 0
    half = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert half["tasks_done"] == 2 and not half["complete"]
    assert long_run.main([*common, "--out", str(tmp_path / "resumed")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("through", "resumed"))
    assert b["complete"] and b["tasks_done"] == 3 and [r["at_task"] for r in b["resumes"]] == [2]
    assert [p["gg_accuracy"] for p in a["per_task"]] == [p["gg_accuracy"] for p in b["per_task"]]
    assert a["accuracy_matrix"]["gn"] == b["accuracy_matrix"]["gn"]
    assert a["vs_tasks"][-1]["confusion"] == b["vs_tasks"][-1]["confusion"]
    for name in ("accuracy_vs_tasks.png", "accuracy_matrix.png"):
        assert (tmp_path / "resumed" / name).stat().st_size > 0
    # complete: a further call changes nothing; another configuration is refused
    assert long_run.main([*common, "--out", str(tmp_path / "resumed")]) == 0
    assert long_run.main(["--tasks", "4", "--iterations", "8", "--eval-images", "10",
                          "--out", str(tmp_path / "resumed")]) == 2
