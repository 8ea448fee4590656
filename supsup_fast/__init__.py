"""supsup_fast: fast Supermasks in Superposition (SupSup) for PyTorch.

One frozen base network (regenerable from a seed), a bank of 1-bit-per-weight task masks, and
kernels that apply one mask, or an alpha-weighted superposition of all of them, without ever
materialising a float mask.
"""

from . import format, ops, reference  # noqa: F401  (ops registers the torch.library ops)
from ._native import EXT_LOADED
from .errors import BackendError, BankFileError, SupsupError

__version__ = "0.1.0"

__all__ = ["format", "ops", "reference", "EXT_LOADED", "SupsupError", "BackendError", "BankFileError"]
