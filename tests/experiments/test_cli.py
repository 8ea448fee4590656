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
from supsup_fast.experiment import eval_batches, eval_indices


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


def test_batch_mode_evaluates_class_mixed_batches():
    """Every evaluated test batch of 128 holds >= 8 digits (the paper's shuffled test loaders), on
    the real MNIST-5k test split (sorted by digit) and its rotated tasks; the order is seeded."""
    bench = data.RotatedMNIST(data.mnist_5k(), 36)
    size = bench.split_size(0, "test")
    for t in range(36):
        batches = eval_batches(size, 1000, 128, t, seed=0)
        picked = torch.cat(batches)
        assert sorted(picked.tolist()) == list(range(size))  # the whole split, each image once
        assert [b.numel() for b in batches] == [128] * 7 + [104]
        for positions in batches:
            _, y = bench.batch(t, "test", positions)
            assert torch.unique(y).numel() >= 8
    # consecutive chunks of the sorted split, the old protocol, fail the same check
    _, y = bench.batch(0, "test", torch.arange(128))
    assert torch.unique(y).numel() <= 2
    # fixed by the seed; another seed or task gives another order
    assert all(torch.equal(a, b) for a, b in zip(eval_batches(size, 1000, 128, 3, 0), eval_batches(size, 1000, 128, 3, 0)))
    assert not torch.equal(eval_batches(size, 1000, 128, 3, 0)[0], eval_batches(size, 1000, 128, 3, 1)[0])
    assert not torch.equal(eval_batches(size, 1000, 128, 3, 0)[0], eval_batches(size, 1000, 128, 4, 0)[0])
    # fewer images than the split: still class-balanced, then shuffled
    few = torch.cat(eval_batches(size, 100, 128, 0, 0))
    assert torch.equal(bench.batch(0, "test", few)[1].bincount(minlength=10), torch.full((10,), 10))


def test_preset_sets_the_papers_rotated_configuration_and_flags_override_it(monkeypatch):
    from supsup_fast import experiment

    seen = []

    def fake_run(cfg, **kwargs):
        seen.append(cfg)
        raise experiment.SupsupError("stop here")

    monkeypatch.setattr(experiment, "run", fake_run)
    assert main(["run", "--preset", "rotated-paper"]) == 2
    c = seen[-1]
    assert (c.benchmark, c.tasks, c.arch, c.outputs, c.binariser) == ("rotated", 36, "fc1024", 200, "threshold")
    assert (c.optimizer, c.lr, c.iterations, c.batch_size) == ("rmsprop", 1e-4, 1000, 128)
    assert (c.scenario, c.method, c.objective, c.batch_mode, c.rows) == ("GNu", "binary", "entropy", "batch", None)
    assert (c.eval_images, c.test_batch_size, c.preset) == (1000, 128, "rotated-paper")
    assert main(["run", "--preset", "rotated-paper", "--arch", "lenet", "--outputs", "100", "--rows", "1"]) == 2
    c = seen[-1]
    assert (c.arch, c.outputs, c.rows, c.method, c.tasks) == ("lenet", 100, 1, "binary", 36)
    assert main(["run"]) == 2 and seen[-1].preset is None and seen[-1].benchmark == "permuted"


def test_nns_with_default_objective_allocates_one_mask_per_task(tmp_path, capsys):
    """No task identity anywhere: the novelty test (entropy, the NNs default) opens a mask at each task
    boundary and nowhere else; each task's images are scored against the mask that trained on them."""
    out = tmp_path / "nns"
    rc = main(["run", "--scenario", "NNs", "--tasks", "3", "--iterations", "60", "--check-every", "30", "--lr", "1e-3",
               "--eval-images", "20", "--no-progress", "--no-bank", "--out", str(out)])
    assert rc == 0
    assert "3 masks allocated for 3 tasks (one per task, in order" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["objective"] == "entropy"
    nns = res["nns"]
    assert nns["masks_allocated"] == 3 and nns["mask_of_task"] == [0, 1, 2] and nns["one_mask_per_task"]
    # checks at batches 30, 60, ..., 150: "new" exactly at the boundaries 60 and 120
    assert [(h["batch"], h["decision"]) for h in nns["history"]] == [
        (30, "continue"), (60, "new"), (90, "continue"), (120, "new"), (150, "continue")]
    # each "new" names the test that found the data novel; the belief test's own verdict is in the record
    assert all((h["novel_by"] is not None) == (h["decision"] == "new") for h in nns["history"])
    assert all((h["slots_times_nu_max"] < 1 + 2 ** -3) <= (h["novel_by"] == "belief") for h in nns["history"])
    assert nns["own_entropy_threshold"] == 0.5
    assert [p["masks_after"] for p in res["per_task"]] == [1, 2, 3]
    final = res["final"]
    assert final["tasks"] == 3 and final["masks"] == 3 and final["images"] == 60
    # a wrong mask scores 0: NNs accuracy never exceeds GG accuracy on the same images
    assert final["accuracy"] <= final["gg_accuracy_same_images"]
    if final["task_inference_accuracy"] == 1.0:
        assert final["accuracy"] == final["gg_accuracy_same_images"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--benchmark", "split", "--tasks", "9"], "split has 5 tasks"),
        (["run", "--outputs", "10", "--objective", "g"], "superfluous outputs"),
        (["run", "--data", "mnist"], "--data-root"),
        (["run", "--device", "cuda"], "no CUDA device"),
        (["run", "--density", "1.5"], "(0, 1]"),
        (["run", "--checkpoints", "50", "--tasks", "3"], "--checkpoints"),
        (["run", "--scenario", "NNs", "--objective", "g"], "needs --objective entropy"),
        (["run", "--scenario", "NNs", "--iterations", "50"], "--iterations >= --check-every"),
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


@pytest.fixture
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_hopfield_subcommand_reports_hamming_and_accuracy(tmp_path, capsys, _restore_threads):
    # one thread: many tiny ops, where a second thread only adds contention on a busy CI machine
    out = tmp_path / "hop"
    cache = tmp_path / "masks.safetensors"
    args = ["hopfield", "--threads", "1", "--hidden", "32", "32", "--train-steps", "20", "--recover-steps", "6",
            "--no-progress",
            "--stress", "4", "12", "--stress-d", "64", "--stress-targets", "3", "--mask-cache", str(cache),
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exact recoveries" in printed and "stress test" in printed
    res = json.loads((out / "hopfield_results.json").read_text())
    assert res["config"]["hidden"] == [32, 32] and res["masks"]["d"] == 64 and res["masks"]["source"] == "trained"
    assert set(res["recoveries"]) == {"storkey", "storkey_plain", "modern"}
    for name, rec in res["recoveries"].items():
        rows = rec["tasks"]
        assert [r["task"] for r in rows] == [0, 1, 2, 3, 4]
        assert all(len(r["hamming"]) == 6 and r["hamming"][-1] == r["final_hamming"] for r in rows)
        assert all(0 <= r["final_hamming"] <= 64 and 0.0 <= r["recovered_acc"] <= 1.0 for r in rows)
    assert res["recoveries"]["storkey"]["bytes"] == 2 * 32 * 32 * 4 and res["recoveries"]["modern"]["bytes"] == 5 * 8
    assert sum(res["masks"]["exact_acc"]) / 5 > 0.3  # ten digit outputs, 20 steps: far above chance (0.1)
    assert [r["stored"] for r in res["stress"]["rows"]] == [4, 4, 12, 12]
    assert (out / "hopfield_results.png").stat().st_size > 0
    # the cached masks are read back (the same masks); a cache trained otherwise is refused with a message
    cached = ["hopfield", "--threads", "1", "--hidden", "32", "32", "--train-steps", "20", "--recover-steps", "2",
              "--no-progress",
              "--memories", "storkey", "--no-paper-baseline", "--mask-cache", str(cache)]
    assert main([*cached, "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "again" / "hopfield_results.json").read_text())
    assert again["masks"]["source"] == "cache" and again["masks"]["pairwise_hamming"] == res["masks"]["pairwise_hamming"]
    assert main([*cached, "--train-steps", "21", "--out", str(tmp_path / "other")]) == 2
    assert "mask cache" in capsys.readouterr().err


def test_hopfield_subcommand_refuses_bad_flags(capsys):
    assert main(["hopfield", "--stress-noise", "0.7", "--no-progress"]) == 2
    assert "--stress-noise" in capsys.readouterr().err
    assert main(["hopfield", "--outputs", "5", "--no-progress"]) == 2
    assert "fewer than the 10" in capsys.readouterr().err
    assert main(["hopfield", "--modern-beta", "-1", "--no-progress"]) == 2
    assert "--modern-beta" in capsys.readouterr().err


def test_version_flag(capsys):
    import supsup_fast
    from supsup_fast.experiments.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"supsup-fast {supsup_fast.__version__}"


def test_every_flag_has_help_and_run_flags_show_their_default():
    import argparse

    from supsup_fast.experiments.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"supsup-fast {name} {a.option_strings}: no help"
    for name in ("run", "hopfield"):  # (info's flags are switches)
        assert isinstance(sub.choices[name].formatter_class("x"), argparse.ArgumentDefaultsHelpFormatter)
    assert "number of tasks (default: every task of a split benchmark, 20 of the others)" in " ".join(
        sub.choices["run"].format_help().split())


def test_out_never_overwrites_an_earlier_run_silently(tmp_path, capsys):
    out = tmp_path / "hop"
    out.mkdir()
    (out / "hopfield_results.json").write_text("{}")
    argv = ["hopfield", "--hidden", "8", "--train-steps", "1", "--recover-steps", "1", "--out", str(out)]
    assert main(argv) == 2
    assert "already holds an earlier run (hopfield_results.json)" in capsys.readouterr().err
    assert (out / "hopfield_results.json").read_text() == "{}"
    run_out = tmp_path / "run"
    (run_out / "bank").mkdir(parents=True)
    assert main(["run", "--tasks", "1", "--iterations", "1", "--out", str(run_out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "hopfield_results.json").read_text())["masks"]["d"] == 8


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from supsup_fast.experiments import cli

    args = cli.build_parser().parse_args(["run"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli._progress(args) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli._progress(args) is True
    assert cli._progress(cli.build_parser().parse_args(["run", "--no-progress"])) is False


def test_shortlist_score_is_checked_and_reaches_inference():
    from supsup_fast.errors import SupsupError
    from supsup_fast.experiments.cli import build_parser
    from supsup_fast.experiments.experiment import ExperimentConfig, _infer_kwargs

    with pytest.raises(SupsupError, match="--shortlist-score must be one of"):
        ExperimentConfig(shortlist_score="nope").validate()
    cfg = ExperimentConfig(shortlist_score="margin")
    cfg.validate()
    assert _infer_kwargs(cfg, 10)["shortlist_score"] == "margin"
    assert build_parser().parse_args(["run", "--shortlist-score", "margin"]).shortlist_score == "margin"


def test_log_axis_labels_every_checkpoint_that_does_not_crowd_the_last_labelled_one():
    from supsup_fast.experiments.experiment import _log_tick_labels

    xs = [1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert _log_tick_labels(xs) == ["1", "2", "5", "10", "20", "50", "100", "200", "", "400", "", "", "", "", "",
                                    "1000"]
    assert _log_tick_labels([1, 2, 5, 10, 20]) == ["1", "2", "5", "10", "20"]
    # the last is always labelled; the labelled one before it gives way when too close
    assert _log_tick_labels([1, 2, 5, 10, 20, 50, 100, 150, 200, 250])[-4:] == ["100", "", "", "250"]


def test_seed_format_flag_runs_and_is_recorded(tmp_path, capsys):
    """``--seed-format 2`` trains and evaluates over the word-hashed base (task forwards of up to 64 rows run the
    ternary kernel) and the run records it; ``--seed-format`` outside the known formats is refused by the parser."""
    from supsup_fast.experiments.experiment import ExperimentConfig

    out = tmp_path / "run"
    rc = main(["run", "--tasks", "2", "--iterations", "30", "--eval-images", "16", "--no-progress",
               "--out", str(out), "--lr", "1e-3", "--seed-format", "2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed_format"] == 2
    assert all(p["gg_accuracy"] > 0.3 for p in res["per_task"])
    assert ExperimentConfig().seed_format == SupsupConfig().seed_format  # the library's default
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", "--seed-format", "3", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "--seed-format" in capsys.readouterr().err


def test_resumed_runs_saved_without_a_seed_format_keep_format_1(tmp_path):
    from dataclasses import asdict

    from supsup_fast.experiments import run_dir
    from supsup_fast.experiments.experiment import ExperimentConfig

    saved = asdict(ExperimentConfig(seed_format=2))
    del saved["seed_format"]  # a results file written before the setting was recorded
    (tmp_path / "results.json").write_text(json.dumps({"config": saved, "complete": False}))
    assert run_dir.resume(str(tmp_path), ExperimentConfig).seed_format == 1
