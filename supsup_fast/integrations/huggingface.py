"""SupSup with Hugging Face ``transformers``: one task per ``Trainer.train()``.

``Trainer`` builds its optimizer from the parameters that require grad before it calls any callback, and
keeps that optimizer across ``train()`` calls. :class:`SupsupCallback` begins a task at ``on_train_begin``,
points that optimizer at the task's parameters alone (the scores, and the ``modules_to_save``), and freezes
the task at ``on_train_end``::

    sf.convert_(model, sf.SupsupConfig(base="pretrained"), modules_to_save=["classifier"])
    cb = SupsupCallback(name="sst2")
    trainer = Trainer(model=model, args=TrainingArguments(..., learning_rate=5e-3), callbacks=[cb], ...)
    trainer.train()                       # task "sst2"
    cb.name, trainer.train_dataset = "mnli", mnli
    trainer.train()                       # task "mnli", with the same Trainer

Scores want a far larger learning rate than fine-tuned weights: ``Trainer``'s default 5e-5 left a small BERT
near chance where 5e-3 trained it (README, "Hugging Face"). Task inference on a model returning a
``ModelOutput`` reads its ``logits`` (:func:`supsup_fast.inference.infer_task`).
"""

from __future__ import annotations

from typing import Optional

from .. import model_tasks as _tasks
from ._optim import point_optimizer

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - only without the optional dependency
    raise ImportError("supsup_fast.integrations.huggingface needs transformers: pip install transformers") from e


class SupsupCallback(TrainerCallback):
    """Begin a task when ``Trainer.train()`` starts, train only its parameters, freeze it when training ends.

    Args:
        name: the new task's name (change ``callback.name`` before the next ``train()`` for the next task).
        task: reopen this frozen task (an id or a name) instead of beginning a new one.
    """

    def __init__(self, name: Optional[str] = None, *, task=None) -> None:
        self.name = name
        self.task = task
        self.frozen: list[int] = []  # the task ids frozen so far, in order

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("SupsupCallback: the Trainer passed no model to on_train_begin")
        if self.task is not None:
            _tasks.begin_task(model, self.task)
        else:
            _tasks.begin_task(model, name=self.name)
        if optimizer is not None:
            point_optimizer(optimizer, _tasks.task_parameters(model))
        model.train()
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.frozen.append(_tasks.freeze_task(model))
        self.task = None
        return control


__all__ = ["SupsupCallback"]
