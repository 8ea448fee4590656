"""The ``supsup-fast`` command end to end: a short real run, and clear errors for bad flags."""

import json
import os
import subprocess
import sys

import pytest

import torch

from supsup_fast import checkpoint, convert, data, models
from supsup_fast.cli import main
from supsup_fast.config import SupsupConfig
from supsup_fast.experiment import eval_indices


def test_short_run_writes_results_plot_and_bank(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--tasks", "2", "--iterations", "30", "--eval-images", "16", "--no-progress",
               "--out", str(out), "--lr", "1e-3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GG accuracy" in printed and "task-inf acc" in printed and "KiB per task" in printed
    res = json.loads((out / "results.json").read_text())
    assert [p["task"] for p in res["per_task"]] == [0, 1]
    # 30 RMSprop steps on real MNIST digits already beat chance (10%) by far
    assert all(p["gg_accuracy"] > 0.3 for p in res["per_task"])
    final = res["final"]
    assert final["tasks"] == 2 and final["images"] == 32
    assert 0.0 <= final["task_inference_accuracy"] <= 1.0
    assert sum(map(sum, final["confusion"])) == 32
    if final["task_inference_accuracy"] == 1.0:  # every task right: GNu scores exactly what GG does
        assert final["accuracy"] == final["gg_accuracy_same_images"]
    # LeNet-300-100 with 100 outputs: 784*300 + 300*100 + 100*100 bits, row-padded to 32-bit words
    per_task = 300 * 25 * 4 + 100 * 10 * 4 + 100 * 4 * 4
    assert res["memory"]["mask_bytes_per_task"] == per_task
    assert (out / "accuracy_vs_tasks.png").stat().st_size > 1000
    # the saved bank reloads into a fresh model and reproduces the GG accuracy of task 1
    fresh = models.lenet_300_100(100)
    convert.convert_(fresh, SupsupConfig(binariser="threshold", seed=0))
    checkpoint.load_bank(fresh, res["bank_path"])
    assert convert.num_tasks(fresh) == 2


def test_task_inference_images_cover_every_class():
    """MNIST-5k's test split is sorted by digit: the evaluated images must still span all of them."""
    y = data.mnist_5k().y_test
    for count in (10, 100, 1000, 5000):
        picked = y[eval_indices(y.numel(), count)]
        assert picked.numel() == min(count, y.numel())
        assert torch.equal(picked.bincount(minlength=10), torch.full((10,), picked.numel() // 10))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--benchmark", "split", "--tasks", "9"], "split has 5 tasks"),
        (["run", "--outputs", "10", "--objective", "g"], "superfluous outputs"),
        (["run", "--data", "mnist"], "--data-root"),
        (["run", "--device", "cuda"], "no CUDA device"),
        (["run", "--density", "1.5"], "(0, 1]"),
        (["run", "--checkpoints", "50", "--tasks", "3"], "--checkpoints"),
    ],
)
def test_impossible_combinations_get_a_clear_message(argv, message, capsys):
    if "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flag_is_an_argparse_error_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "supsup_fast", "run", "--tasks", "zero"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "positive integer" in proc.stderr and "Traceback" not in proc.stderr


def test_info_reports_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == "available"
    assert set(info["ops"]) >= {"masked_linear@cpu", "mask_dots@cpu", "superpose@cpu"}


def test_hopfield_subcommand_reports_hamming_and_accuracy(tmp_path, capsys):
    out = tmp_path / "hop"
    rc = main(["hopfield", "--hidden", "32", "32", "--train-steps", "40", "--recover-steps", "8", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    assert "exact recoveries" in capsys.readouterr().out
    res = json.loads((out / "hopfield_results.json").read_text())
    rows = res["report"]["tasks"]
    assert [r["task"] for r in rows] == [0, 1, 2, 3, 4] and res["d"] == 64
    assert all(0 <= r["hamming"] <= 64 and 0.0 <= r["recovered_acc"] <= 1.0 for r in rows)
    assert res["report"]["mean_exact_acc"] > 0.6  # 40 steps on two-digit tasks: far above chance (0.5)
