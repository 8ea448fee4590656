"""``triton``: the Triton kernels of ``kernels/`` (installed as ``supsup_fast.kernels``) on CUDA tensors.

Registered by :func:`supsup_fast.backends.register_all` when ``triton`` imports and a CUDA device
is present; :func:`register_triton` registers it for other devices too (the CPU under
``TRITON_INTERPRET=1``, for tests). Between the fused matmuls and ``apply_mask`` + cuBLAS the
measured dispatch table of :mod:`.gpu_dispatch` decides per shape class (its documented defaults
until a GPU run has filled one). Per-shape checks are O(1) on tensor metadata; the kernels index
with int64, so no size is refused.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..ops import Backend, register_backend
from . import _composite, gpu_dispatch

NAME, PRIORITY = "triton", 20
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtypes the pack / unpack kernels read and write (bool travels as uint8)
BIT_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)
GRID_Y_LIMIT = 65535  # rows of v map to a grid axis

TRITON_ERROR: Optional[str] = None


def _import_triton_kernels():
    """``(masked_matmul, mask_ops)`` modules, or ``None`` with :data:`TRITON_ERROR` set."""
    global TRITON_ERROR
    try:
        from ..kernels import mask_ops, masked_matmul
    except Exception as e:  # triton missing or broken: the other backends serve
        TRITON_ERROR = f"{type(e).__name__}: {e}"
        return None
    return masked_matmul, mask_ops


def _on_tensor_device(fn):
    """Run a Triton launcher with its first tensor's GPU current (Triton launches on the current one)."""

    @functools.wraps(fn)
    def run(*args):
        dev = args[0].device
        if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return fn(*args)
        return fn(*args)

    return run


def _ternary_linear(mm):
    """``ternary_linear`` by seed format: format 1 is ``masked_linear_seeded``'s base, format 2 the
    word-hashed one (the signs of 32 weights per hash, read with the mask words)."""

    def ternary_linear(x, mask_words, seed, layer, scale, bias=None, format_version=2):
        if format_version == 1:
            return mm.masked_linear_seeded(x, mask_words, seed, layer, scale, bias)
        return mm.ternary_linear(x, mask_words, seed, layer, scale, bias)

    return ternary_linear


def triton_impls() -> dict:
    """The Triton launchers, keyed by op name (raises ImportError without triton)."""
    mods = _import_triton_kernels()
    if mods is None:
        raise ImportError(f"the Triton kernels are unavailable: {TRITON_ERROR}")
    mm, mo = mods
    launchers = {
        "pack_masks": mo.pack_masks,
        "unpack_masks": mo.unpack_masks,
        "apply_mask": mo.apply_mask,
        "masked_linear": gpu_dispatch.linear_provider(mm.masked_linear, mo.apply_mask),
        "masked_linear_grad_input": gpu_dispatch.grad_input_provider(mm.masked_linear_grad_input, mo.apply_mask),
        "masked_weight_grad": mm.masked_weight_grad,
        "superpose": mo.superpose,
        "mask_dots": mo.mask_dots,
        "masked_linear_grouped": mm.masked_linear_grouped,
        "masked_linear_grouped_grad_input": mm.masked_linear_grouped_grad_input,
        "masked_linear_seeded": mm.masked_linear_seeded,
        "signed_constant_fill_": mo.signed_constant_fill_,
        "ternary_linear": _ternary_linear(mm),
    }
    impls = {op: _on_tensor_device(fn) for op, fn in launchers.items()}
    impls["masked_conv2d"] = _composite.conv2d_over_apply_mask(impls["apply_mask"])
    impls["masked_weight_grad_sign"] = _composite.weight_grad_times_sign(impls["masked_weight_grad"])
    return impls


def _check_weight_grad(grad_out, x, weight, *rest) -> Optional[str]:
    if weight.dtype not in GPU_DTYPES:
        return f"weight dtype {weight.dtype} is not fp16/bf16/fp32"
    return None


def check_mask_dots(v, bank) -> Optional[str]:
    if v.dim() == 3 and v.shape[0] > GRID_Y_LIMIT:
        return f"more than {GRID_Y_LIMIT} rows of v"
    return None


def _check_pack(masks) -> Optional[str]:
    return None if masks.dtype in BIT_DTYPES else f"cannot read masks of dtype {masks.dtype}"


def _check_unpack(words, k, dtype) -> Optional[str]:
    return None if dtype in BIT_DTYPES else f"cannot write masks of dtype {dtype}"


CHECKS = {
    "pack_masks": _check_pack,
    "unpack_masks": _check_unpack,
    "mask_dots": check_mask_dots,
    "masked_weight_grad": _check_weight_grad,
    "masked_weight_grad_sign": _check_weight_grad,
}


def backend(devices: tuple[str, ...] = ("cuda",), priority: int = PRIORITY) -> Backend:
    """The ``triton`` backend for ``devices`` (unavailable, with the reason, without triton)."""
    try:
        impls = triton_impls()
    except ImportError:
        return Backend(name=NAME, priority=priority, devices=devices, available=False,
                       why_unavailable=f"triton did not import ({TRITON_ERROR})")
    return Backend(name=NAME, priority=priority, devices=devices, impls=impls, dtypes=GPU_DTYPES, checks=CHECKS)


def unavailable(why: str) -> Backend:
    return Backend(name=NAME, priority=PRIORITY, devices=("cuda",), available=False, why_unavailable=why)


def register_triton(devices: tuple[str, ...] = ("cuda",), priority: int = PRIORITY) -> Backend:
    """Register the ``triton`` backend for ``devices`` (e.g. ``("cpu",)`` under ``TRITON_INTERPRET=1``)."""
    b = backend(devices, priority)
    register_backend(b)
    return b
