"""Continual-learning metrics: the formulas on hand-made matrices, and what a real run records."""

import json

import pytest
import torch

from supsup_fast.experiments import experiment, metrics


def test_summarise_computes_average_accuracy_backward_transfer_and_forgetting():
    rows = {1: [0.9], 2: [0.8, 0.7], 3: [0.85, 0.6, 0.5]}
    got = metrics.summarise(rows)
    assert got["average_accuracy"] == pytest.approx((0.85 + 0.6 + 0.5) / 3)
    # BWT: final minus just-learned, tasks 0 and 1: (0.85 - 0.9 + 0.6 - 0.7) / 2
    assert got["backward_transfer"] == pytest.approx(-0.075)
    # forgetting: best earlier value minus final: task 0 max(0.9, 0.8) - 0.85, task 1 0.7 - 0.6
    assert got["forgetting"] == pytest.approx([0.05, 0.1])
    assert got["mean_forgetting"] == pytest.approx(0.075) and got["max_forgetting"] == pytest.approx(0.1)
    assert got["rows_measured"] == 3


def test_summarise_with_sparse_rows_uses_the_measured_diagonal():
    rows = {3: [0.5, 0.5, 0.5], 5: [0.5, 0.4, 0.6, 0.7, 0.9]}
    diag = [0.6, 0.5, 0.5, 0.8, 0.9]
    got = metrics.summarise(rows, diag)
    assert got["backward_transfer"] == pytest.approx(((0.5 - 0.6) + (0.4 - 0.5) + (0.6 - 0.5) + (0.7 - 0.8)) / 4)
    assert got["forgetting"] == pytest.approx([0.1, 0.1, -0.1, 0.1])  # task 2 improved: negative forgetting
    assert metrics.summarise({}) is None
    with pytest.raises(ValueError, match="row after 2 tasks"):
        metrics.summarise({2: [0.1]})


def test_matrix_rows_are_every_task_for_short_runs_else_the_checkpoints():
    assert metrics.matrix_rows(4, [1, 2]) == [1, 2, 3, 4]
    n = metrics.FULL_MATRIX_TASKS + 50
    assert metrics.matrix_rows(n, [1, 10, 100]) == [1, 10, 100, n]


def test_loss_curve_is_window_means():
    c = experiment.loss_curve([float(i) for i in range(120)])
    assert c["batches_per_point"] == 3 and len(c["mean_loss"]) == 40 and c["mean_loss"][0] == pytest.approx(1.0)
    assert experiment.loss_curve([2.0, 4.0]) == {"batches_per_point": 1, "mean_loss": [2.0, 4.0]}


def test_a_run_records_the_accuracy_matrix_metrics_memory_and_environment(tmp_path):
    torch.set_num_threads(1)
    cfg = experiment.ExperimentConfig(tasks=3, iterations=15, eval_images=20, method="one_shot", checkpoints=[2, 3],
                                      progress=False, save_bank=False, out_dir=str(tmp_path))
    experiment.run(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["accuracy_matrix"]
    assert m["rows_after_tasks"] == [1, 2, 3]
    assert sorted(m["gg"]) == ["1", "2", "3"] and [len(m["gg"][k]) for k in ("1", "2", "3")] == [1, 2, 3]
    assert sorted(m["gn"]) == ["2", "3"]  # GN rows where task inference was measured
    # GN's row is the per-task breakdown of the checkpoint's measurement: its mean is the GNu accuracy
    final = res["vs_tasks"][-1]
    assert sum(m["gn"]["3"]) / 3 == pytest.approx(final["accuracy"])
    assert sum(m["gg"]["3"]) / 3 == pytest.approx(final["gg_accuracy_same_images"])
    # frozen masks: GG accuracy on the same images cannot change, so forgetting and BWT measure 0
    gg = m["gg_metrics"]
    assert gg["mean_forgetting"] == 0.0 and gg["backward_transfer"] == 0.0
    assert gg["average_accuracy"] == pytest.approx(sum(m["gg"]["3"]) / 3)
    assert m["gn_metrics"]["rows_measured"] == 2
    assert m["gg_diagonal"] == [m["gg"][str(n)][n - 1] for n in (1, 2, 3)]
    curve = res["per_task"][0]["loss_curve"]
    assert curve["batches_per_point"] == 1 and len(curve["mean_loss"]) == 15
    assert res["peak_memory"]["max_rss_bytes"] > 10 * 2**20
    env = res["environment"]
    assert env["supsup_fast"] and env["cpu_model"]
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_tasks.png").stat().st_size > 0
    assert "GG continual-learning metrics over 3 measured rows" in experiment.summary_table(res)
