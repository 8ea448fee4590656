"""Drop-in SupSup layers: masked ``Linear`` / ``Conv2d`` over a frozen base, per-task BatchNorm."""

from ._model import (
    masked_modules,
    model_device,
    named_task_modules,
    preserved_mode,
    task_modules,
)
from .base import MODES, TaskModule
from .masked import MaskedConv2d, MaskedLayerBase, MaskedLinear
from .norm import TaskBatchNorm, TaskBatchNorm1d, TaskBatchNorm2d

__all__ = [
    "MODES",
    "TaskModule",
    "MaskedLayerBase",
    "MaskedLinear",
    "MaskedConv2d",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "named_task_modules",
    "task_modules",
    "masked_modules",
    "model_device",
    "preserved_mode",
]
