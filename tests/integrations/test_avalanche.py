"""SupSup inside Avalanche: Avalanche's own PermutedMNIST (fed offline from MNIST-5k), metrics and loggers."""

import os

import torch
from _frameworks import need
from torch import nn

import supsup_fast as sf

need("avalanche.training")
need("mlxtend")
from avalanche.benchmarks.classic import PermutedMNIST  # noqa: E402
from avalanche.evaluation.metrics import (  # noqa: E402
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    ram_usage_metrics,
    timing_metrics,
)
from avalanche.logging import CSVLogger  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from supsup_fast.integrations.avalanche import supsup_strategy, write_mnist_5k  # noqa: E402


def lenet():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def test_permuted_mnist_gg_and_gn_with_avalanche_metrics(tmp_path):
    torch.manual_seed(0)
    root = write_mnist_5k(str(tmp_path / "data"))
    bench = PermutedMNIST(n_experiences=2, seed=0, dataset_root=root, return_task_id=True)
    assert len(bench.train_stream[0].dataset) == 4000 and len(bench.test_stream[0].dataset) == 1000
    model = sf.convert_(lenet(), sf.SupsupConfig(density=0.5))
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True), timing_metrics(epoch=True), ram_usage_metrics(epoch=True),
        loggers=[CSVLogger(str(tmp_path / "csv"))])
    strategy = supsup_strategy(model, lambda p: torch.optim.Adam(p, lr=0.01), train_mb_size=128, train_epochs=1,
                               eval_mb_size=500, evaluator=evaluator)
    for exp in bench.train_stream:
        strategy.train(exp)
    res = strategy.eval(bench.test_stream)
    assert sf.tasks(model) == ["experience 0", "experience 1"]
    accs = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task00{t}/Exp00{t}"] for t in range(2)]
    assert min(accs) > 0.6, accs
    assert res["StreamForgetting/eval_phase/test_stream"] == 0.0  # masks are frozen: nothing is forgotten
    assert res["StreamBWT/eval_phase/test_stream"] == 0.0
    assert os.path.exists(tmp_path / "csv" / "eval_results.csv")

    # GN: no task label used; each test image's task is inferred, then the minibatch runs with per-row tasks
    gn = supsup_strategy(model, lambda p: torch.optim.Adam(p, lr=0.01), scenario="GN", eval_mb_size=500,
                         evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    gn.supsup.label_to_task.update(strategy.supsup.label_to_task)
    res_gn = gn.eval(bench.test_stream)
    gn_accs = [res_gn[f"Top1_Acc_Exp/eval_phase/test_stream/Task00{t}/Exp00{t}"] for t in range(2)]
    assert gn.supsup.task_inference["count"] == 2000
    assert gn.supsup.task_inference_accuracy > 0.9, gn.supsup.task_inference
    assert min(gn_accs) > 0.55, gn_accs
