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
    ConversionSummary,
    convert_,
    masked_layers,
    merge_task,
    print_trainable_parameters,
    register_conversion,
    summary,
    unconvert,
)
from .errors import BackendError, BankFileError, ConversionWarning, SupsupError
from .model_tasks import (
    begin_task,
    delete_task,
    discard_task,
    freeze_task,
    mask_nbytes,
    num_tasks,
    recalibrate_norms,
    rename_task,
    set_row_tasks,
    set_superposition,
    set_task,
    task,
    task_id,
    task_parameters,
    tasks,
)
from .nn import MaskedConv2d, MaskedLayerBase, MaskedLinear, TaskBatchNorm, TaskDense

__version__ = "0.1.0"

# Loaded on first use, so `import supsup_fast` stays light (no data loaders, tqdm, matplotlib,
# safetensors): `sf.inference.infer_task(...)` and `from supsup_fast import checkpoint` both work.
_LAZY = ("checkpoint", "data", "distributed", "experiment", "experiments", "hopfield", "inference", "info",
         "integrations", "models", "nns", "objectives", "ternary", "testing", "training")
# functions of lazily loaded modules, reachable as sf.<name>
_LAZY_FUNCTIONS = {"save_pretrained": "checkpoint", "from_pretrained": "checkpoint", "export_task": "checkpoint"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_FUNCTIONS))

__all__ = [
    "format", "ops", "reference", "seed_format", "EXT_LOADED", "SupsupError", "BackendError", "BankFileError",
    "ConversionWarning", "SupsupConfig", "topk_mask", "threshold_mask",
    "MaskedLayerBase", "MaskedLinear", "MaskedConv2d", "TaskBatchNorm", "TaskDense",
    "convert_", "register_conversion", "summary", "ConversionSummary", "print_trainable_parameters",
    "merge_task", "unconvert", "masked_layers",
    "begin_task", "freeze_task", "discard_task", "delete_task", "rename_task", "task", "tasks", "task_id",
    "set_task", "set_row_tasks", "set_superposition", "num_tasks", "task_parameters", "mask_nbytes",
    "recalibrate_norms", "save_pretrained", "from_pretrained", "export_task",
    "checkpoint", "hopfield", "inference", "nns", "ternary", "training",
]

# every backend this installation can run; an explicit call, never a side effect of an import
backends.register_all()
