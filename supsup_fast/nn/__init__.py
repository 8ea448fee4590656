"""Drop-in SupSup layers: masked ``Linear`` / ``Conv2d`` over a frozen base, per-task BatchNorm, per-task dense
modules (heads kept per task) and the twins of timm's norm-with-activation and "same"-padding conv."""

from ._model import (
    masked_modules,
    model_device,
    named_task_modules,
    preserved_mode,
    task_modules,
)
from .base import MODES, TaskModule
from .dense import TaskDense
from .masked import MaskedConv2d, MaskedLayerBase, MaskedLinear
from .norm import TaskBatchNorm, TaskBatchNorm1d, TaskBatchNorm2d
from .wrappers import SamePad2d, SamePadConv2d, TaskBatchNormAct

__all__ = [
    "MODES",
    "TaskModule",
    "MaskedLayerBase",
    "MaskedLinear",
    "MaskedConv2d",
    "TaskBatchNorm",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskBatchNormAct",
    "TaskDense",
    "SamePad2d",
    "SamePadConv2d",
    "named_task_modules",
    "task_modules",
    "masked_modules",
    "model_device",
    "preserved_mode",
]
