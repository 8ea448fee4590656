"""supsup_fast: fast Supermasks in Superposition (SupSup) for PyTorch.

One frozen base network (regenerable from a seed), a bank of 1-bit-per-weight task masks, and
kernels that apply one mask, or an alpha-weighted superposition of all of them, without ever
materialising a float mask.
"""

from . import backends, format, ops, reference, seed_format  # noqa: F401  (ops defines the torch.library ops)
from .backends._ext import EXT_LOADED
from .binarise import threshold_mask, topk_mask
from .config import SupsupConfig
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
from .errors import BackendError, BankFileError, SupsupError
from .nn import MaskedConv2d, MaskedLayerBase, MaskedLinear, TaskBatchNorm

__version__ = "0.1.0"

# Loaded on first use, so `import supsup_fast` stays light (no data loaders, tqdm, matplotlib,
# safetensors): `sf.inference.infer_task(...)` and `from supsup_fast import checkpoint` both work.
_LAZY = ("checkpoint", "data", "distributed", "experiment", "experiments", "hopfield", "inference", "info",
         "models", "nns", "objectives", "ternary", "testing", "training")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "format", "ops", "reference", "seed_format", "EXT_LOADED", "SupsupError", "BackendError", "BankFileError",
    "SupsupConfig", "topk_mask", "threshold_mask",
    "MaskedLayerBase", "MaskedLinear", "MaskedConv2d", "TaskBatchNorm",
    "convert_", "masked_layers", "begin_task", "freeze_task", "set_task", "set_superposition",
    "num_tasks", "task_parameters", "mask_nbytes",
    "checkpoint", "hopfield", "inference", "nns", "ternary", "training",
]

# every backend this installation can run; an explicit call, never a side effect of an import
backends.register_all()
