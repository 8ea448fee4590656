"""Smoke test of bench/task_inference_methods.py on a tiny trained run: every variant measured on
the run's own images, accuracies repeat exactly, the JSON holds what the README tables quote."""

import json
import os
import sys

import torch

from supsup_fast.experiments.cli import main as cli_main

sys.path.insert(0, os.path.dirname(__file__))
import task_inference_methods as tim  # noqa: E402


def test_methods_table_on_a_saved_run(tmp_path, capsys):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path / "run"
        assert cli_main(["run", "--benchmark", "rotated", "--tasks", "3", "--iterations", "20", "--lr", "1e-3",
                         "--batch-mode", "batch", "--rows", "all", "--objective", "entropy", "--eval-images", "200",
                         "--checkpoints", "3", "--no-progress", "--out", str(run)]) == 0
        out = tmp_path / "methods.json"
        assert tim.main([str(run), "--repeats", "2", "--variants", "one_shot", "binary", "shortlist:auto",
                         "shortlist:rows:3", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(saved)
    printed = capsys.readouterr().out
    assert "x binary" in printed and "shortlist:auto" in printed
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["variants"]}
    assert set(rows) == {"one_shot", "binary", "shortlist:auto", "shortlist:rows:3"}
    ran = json.loads((run / "results.json").read_text())
    for r in rows.values():
        assert r["images"] == 600 and r["inferences"] == 6 and len(r["seconds"]) == 2
        assert sum(map(sum, r["confusion"])) == 600 and r["min_classes_per_batch"] >= 8
    assert rows["binary"]["time_vs_binary"] == 1.0
    # the run measured with its default method (shortlist, auto): the script reproduces it exactly
    assert ran["config"]["method"] == "shortlist"
    for k in ("confusion", "accuracy", "task_inference_accuracy", "gg_accuracy_same_images"):
        assert rows["shortlist:auto"][k] == ran["final"][k]
    # shortlist:auto with 3 tasks and a shortlist of 4 scores every task on all rows, like rows:3
    assert rows["shortlist:auto"]["confusion"] == rows["shortlist:rows:3"]["confusion"]
    assert tim.parse_variant("shortlist:rows:4:16") == {"method": "shortlist", "shortlist_by": "rows", "shortlist": 4,
                                                        "shortlist_rows": 16}
    assert tim.parse_variant("shortlist:rows:4:16:margin") == {"method": "shortlist", "shortlist_by": "rows",
                                                               "shortlist": 4, "shortlist_rows": 16,
                                                               "shortlist_score": "margin"}
