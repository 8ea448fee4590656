"""Drop-in SupSup layers: masked ``Linear`` / ``Conv2d`` over a frozen base, per-task BatchNorm."""

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
]
