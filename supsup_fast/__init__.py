"""supsup_fast: fast Supermasks in Superposition (SupSup) for PyTorch.

One frozen base network (regenerable from a seed), a bank of 1-bit-per-weight task masks, and
kernels that apply one mask, or an alpha-weighted superposition of all of them, without ever
materialising a float mask.
"""

from . import format, ops, reference  # noqa: F401  (ops registers the torch.library ops)
from ._native import EXT_LOADED
from .errors import BackendError, BankFileError, SupsupError
from .config import SupsupConfig
from .binarize import threshold_mask, topk_mask
from .nn import MaskedConv2d, MaskedLayerBase, MaskedLinear, TaskBatchNorm
from .convert import (
    begin_task,
    convert_,
    freeze_task,
    mask_nbytes,
    masked_layers,
    num_tasks,
    set_superposition,
    set_task,
    task_parameters,
)

from . import checkpoint, data, hopfield, inference, models, nns, training  # noqa: E402,F401
from . import seed_format, ternary  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = [
    "format", "ops", "reference", "EXT_LOADED", "SupsupError", "BackendError", "BankFileError",
    "SupsupConfig", "topk_mask", "threshold_mask",
    "MaskedLayerBase", "MaskedLinear", "MaskedConv2d", "TaskBatchNorm",
    "convert_", "masked_layers", "begin_task", "freeze_task", "set_task", "set_superposition",
    "num_tasks", "task_parameters", "mask_nbytes",
    "checkpoint", "data", "hopfield", "inference", "models", "nns", "training", "seed_format", "ternary",
]
