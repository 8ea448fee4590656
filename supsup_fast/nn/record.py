"""What a model's SupSup modules do not say themselves: what its tasks are called and what ``convert_`` did.

A :class:`ModelRecord` hangs on the converted model (a plain attribute: not a module, parameter or
state-dict entry, and copied by ``copy.deepcopy``). It holds

* the task names, by task id (``None`` for an unnamed task), and the name of the open task;
* how the model was converted: the config, every module swapped (its name and original class),
  every module left dense (and why), the ``modules_to_save`` kept per task.

A bank stores the names and the conversion (:func:`~supsup_fast.checkpoint.save_bank` /
:func:`~supsup_fast.checkpoint.save_pretrained`), so both survive a save and a load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..config import SupsupConfig

ATTR = "_supsup_record"


@dataclass
class ModelRecord:
    """Task names and the conversion of one model.

    Attributes:
        task_names: name (or ``None``) of each frozen task, by id.
        open_name: name given to the task in training, stored at ``freeze_task``.
        config: the :class:`SupsupConfig` ``convert_`` used (``None`` for a model built from SupSup layers).
        converted: ``{module name: original class}`` of every module ``convert_`` swapped.
        dense: ``{module name: reason}`` of modules with weights that ``convert_`` left dense.
        modules_to_save: names of the dense modules kept per task (:class:`~supsup_fast.nn.TaskDense`).
        biases_dropped: names of the converted layers whose bias was dropped (``keep_bias=False``).
        fused_flags: ``{module name: (attribute, value)}`` of the fused transformer paths ``convert_`` switched off.
        trainable: names of the parameters that required grad before ``convert_`` froze them.
    """

    task_names: list = field(default_factory=list)
    open_name: Optional[str] = None
    config: Optional[SupsupConfig] = None
    converted: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    modules_to_save: list = field(default_factory=list)
    biases_dropped: list = field(default_factory=list)
    fused_flags: dict = field(default_factory=dict)
    trainable: list = field(default_factory=list)

    def names(self, count: int) -> list:
        """The names of ``count`` frozen tasks (``None`` past the recorded ones; extra entries are dropped, as a
        state dict with fewer tasks leaves them)."""
        del self.task_names[count:]
        self.task_names.extend([None] * (count - len(self.task_names)))
        return self.task_names


def find_record(model: nn.Module) -> Optional[ModelRecord]:
    """The record of ``model``, or of the first submodule holding one (a wrapper such as DDP), or ``None``."""
    rec = model.__dict__.get(ATTR)
    if rec is not None:
        return rec
    for m in model.modules():
        rec = m.__dict__.get(ATTR)
        if rec is not None:
            return rec
    return None


def record_of(model: nn.Module) -> ModelRecord:
    """The record of ``model`` (see :func:`find_record`), created on ``model`` if it has none."""
    rec = find_record(model)
    if rec is None:
        rec = ModelRecord()
        model.__dict__[ATTR] = rec
    return rec
