"""SplitMNIST and SplitCIFAR-100 through the API and the CLI: per-benchmark defaults, shared (GNs) and
unshared (GNu) labels, and SplitCIFAR-100 with the reduced ResNet-18 on CIFAR-100 files in the real format."""

from __future__ import annotations

import json

import pytest

from supsup_fast import checkpoint, convert
from supsup_fast.cli import build_parser, main
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError
from supsup_fast.experiments import data, experiment, models


def _config(argv):
    """The ExperimentConfig the CLI builds for ``argv``, validated (nothing runs)."""
    captured = []
    original = experiment.run
    experiment.run = lambda cfg, **kw: captured.append(cfg) or cfg.validate() or {}
    try:
        args = build_parser().parse_args(argv)
        try:
            args.func(args)
        except (KeyError, TypeError):  # the summary of the stubbed run
            pass
    finally:
        experiment.run = original
    return captured[0]


@pytest.mark.parametrize("argv, tasks, outputs", [
    (["run", "--benchmark", "split"], 5, 100),
    (["run", "--benchmark", "split", "--data", "cifar100", "--data-root", "x"], 20, 200),  # GNu: 100 labels + 100
    (["run", "--benchmark", "split", "--data", "cifar100", "--data-root", "x", "--scenario", "GNs"], 20, 100),
    (["run", "--benchmark", "rotated"], 20, 100),
    (["run"], 20, 100),
])
def test_each_benchmark_has_its_own_default_tasks_and_outputs(argv, tasks, outputs):
    cfg = _config(argv)
    assert (cfg.tasks, cfg.outputs) == (tasks, outputs)


def test_split_classes_takes_num_tasks():
    src = data.mnist_5k()
    bench = data.SplitMNIST(src, num_tasks=3)
    assert bench.num_tasks == 3 and [bench.classes(t) for t in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert data.SplitMNIST(src).num_tasks == 5
    for bad in (0, 6, 2.0, True):
        with pytest.raises(SupsupError, match="num_tasks"):
            data.SplitMNIST(src, num_tasks=bad)


def test_gnu_keeps_each_tasks_labels_on_its_own_outputs():
    """GNs: every task's labels are 0..1 (shared); GNu: task t's digits keep their own labels 2t, 2t+1."""
    for scenario, task1 in (("GNs", [0, 1]), ("GNu", [2, 3]), ("GG", [0, 1])):
        cfg = experiment.ExperimentConfig(benchmark="split", scenario=scenario, tasks=2)
        cfg.validate()
        bench = experiment.build_benchmark(cfg)
        assert bench.task(1).y_test.unique().tolist() == task1, scenario
        assert bench.task(1).y_test_original.unique().tolist() == [2, 3]
        assert bench.num_classes == (10 if scenario == "GNu" else 2)


@pytest.mark.parametrize("scenario", ["GG", "GNs", "GNu"])
def test_split_mnist_runs_with_no_tasks_flag(scenario, tmp_path, capsys):
    out = tmp_path / scenario
    rc = main(["run", "--benchmark", "split", "--scenario", scenario, "--iterations", "25", "--lr", "1e-3",
               "--eval-images", "20", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and len(res["per_task"]) == 5
    assert res["data"]["tasks_classes"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert res["data"]["remap_labels"] is (scenario != "GNu")
    # two digits per task: 25 steps already beat chance (50%) by far
    assert min(p["gg_accuracy"] for p in res["per_task"]) > 0.8
    if scenario != "GG":
        final = res["final"]
        assert final["tasks"] == 5 and final["images"] == 100 and sum(map(sum, final["confusion"])) == 100


def test_split_cifar100_resnet18_gg_on_files_in_the_real_format(data_root, tmp_path, capsys):
    """The paper's GG benchmark (tasks of 5 CIFAR-100 classes, reduced ResNet-18), read from
    ``cifar-100-python/{train,test}`` pickles by the restricted unpickler; 3 of its 20 tasks keep CI short
    (the default of 20 is checked above)."""
    out = tmp_path / "cifar"
    rc = main(["run", "--benchmark", "split", "--data", "cifar100", "--data-root", str(data_root),
               "--arch", "resnet18", "--scenario", "GG", "--tasks", "3", "--iterations", "2", "--batch-size", "4",
               "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and len(res["per_task"]) == 3
    assert res["data"]["source"]["name"] == "cifar100" and res["data"]["source"]["num_classes"] == 100
    assert res["data"]["source"]["image_shape"] == [3, 32, 32]
    assert res["data"]["tasks_classes"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert res["config"]["outputs"] == 100 and res["vs_tasks"] == []  # GG: no task inference
    assert all(0.0 <= p["gg_accuracy"] <= 1.0 for p in res["per_task"])
    # the bank reloads into a fresh reduced ResNet-18 and gives back every task's GG accuracy
    model = models.build("resnet18", 100, (3, 32, 32))
    convert.convert_(model, SupsupConfig(binariser="threshold", seed=0))
    info = checkpoint.load_bank(model, out / "bank")
    assert info.num_tasks == 3 and convert.num_tasks(model) == 3
    cfg = experiment.ExperimentConfig(**res["config"])
    bench = experiment.build_benchmark(cfg)
    for t in (0, 2):
        assert experiment._gg_accuracy(model, bench, t, 64) == pytest.approx(res["per_task"][t]["gg_accuracy"])


def test_crafted_cifar_file_is_refused_through_the_cli(tmp_path, capsys):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split in ("train", "test"):
        (base / split).write_bytes(pickle.dumps({"data": Evil(), "fine_labels": []}, protocol=2))
    rc = main(["run", "--benchmark", "split", "--data", "cifar100", "--data-root", str(tmp_path), "--no-progress",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "not part of the CIFAR format" in err and "Traceback" not in err
    assert not (tmp_path / "ran").exists()
