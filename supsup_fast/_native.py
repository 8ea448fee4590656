"""Load the compiled extension and register its backends with the op layer.

``supsup_fast._C`` holds the C++ kernels (``csrc/``) as ops in the private ``supsup_fast_C``
namespace, registered for the CPU key (and the CUDA key when built with CUDA). If it is
missing, one warning is given and the reference path serves.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from . import ops as _ops
from .ops import Backend, register_backend

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


def _cpu_ext_impls() -> dict:
    C = torch.ops.supsup_fast_C

    def masked_conv2d(x, weight, mask_words, bias, stride, padding, dilation, groups):
        # one fused W*M pass, then the platform's convolution (oneDNN on CPU)
        return F.conv2d(x, C.apply_mask(weight, mask_words), bias, stride, padding, dilation, groups)

    def masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
        # rows bucketed by task, each bucket through the fused masked dX kernel
        gx = grad_out.new_zeros(grad_out.shape[0], weight.shape[1])
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            gx[rows] = C.masked_linear_grad_input(grad_out[rows], weight, bank[t])
        return gx

    impls = {
        "pack_masks": C.pack_masks.default,
        "unpack_masks": C.unpack_masks.default,
        "apply_mask": C.apply_mask.default,
        # bound without the dispatcher: same kernel, ~1.3 us less per call (most of a small GEMV)
        "masked_linear": _C.masked_linear_cpu,
        "masked_linear_grad_input": C.masked_linear_grad_input.default,
        "masked_weight_grad": C.masked_weight_grad.default,
        "masked_conv2d": masked_conv2d,
        "superpose": C.superpose.default,
        "mask_dots": C.mask_dots.default,
        "masked_linear_grouped": C.masked_linear_grouped.default,
        "masked_linear_grouped_grad_input": masked_linear_grouped_grad_input,
        "masked_linear_seeded": C.masked_linear_seeded.default,
    }
    return impls


if EXT_LOADED:
    register_backend(Backend(name="cpu_ext", priority=10, devices=("cpu",), impls=_cpu_ext_impls()))
    _ops.SIGN_FUSED_WEIGHT_GRAD = (torch.ops.supsup_fast_C.masked_weight_grad.default,
                                   torch.ops.supsup_fast_C.masked_weight_grad_sign.default)
else:
    register_backend(
        Backend(name="cpu_ext", priority=10, devices=("cpu",), available=False,
                why_unavailable=f"compiled extension not loaded ({EXT_ERROR})")
    )

from . import _gpu_backends  # noqa: E402,F401  (registers the triton / cuda backends)
