"""The compiled extension ``supsup_fast._C``: loaded once, or the reason it is not.

It holds the C++ kernels (``csrc/``) as ops of the private ``supsup_fast_C`` namespace, registered
for the CPU key (and the CUDA key when built with CUDA), plus a few directly bound helpers. If it
is missing, one warning is given and the pure-PyTorch reference backend serves.
"""

from __future__ import annotations

import importlib
import os
import warnings

ENV_NO_EXT = "SUPSUP_FAST_NO_EXT"  # set to 1 to ignore the compiled extension at import

EXT_ERROR: str | None = None
try:
    if os.environ.get(ENV_NO_EXT, "") not in ("", "0"):
        raise ImportError(f"{ENV_NO_EXT} is set")
    _C = importlib.import_module("supsup_fast._C")
except ImportError as e:  # pragma: no cover - exercised by installs without a compiler
    _C = None
    EXT_ERROR = str(e)
    if os.environ.get(ENV_NO_EXT, "") in ("", "0"):
        warnings.warn(
            f"supsup_fast: compiled extension not loaded ({e}); using the pure-PyTorch reference path. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )

EXT_LOADED = _C is not None


def ext_has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return EXT_LOADED and bool(getattr(_C, "WITH_CUDA", False))
