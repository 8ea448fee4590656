"""Registration of the GPU backends: Triton kernels and the CUDA extension.

* ``triton`` (priority 20): every op, as fused Triton kernels (``supsup_fast.kernels``). Registered
  when ``triton`` imports and CUDA is available; :func:`register_triton` registers it for other
  devices too (the CPU under ``TRITON_INTERPRET=1``, for tests).
* ``cuda`` (priority 30): the extension's CUDA kernels (``csrc/cuda``) for the bandwidth-bound
  ops (pack / unpack, superpose, mask_dots) and the seeded GEMV; registered when the extension
  was built with CUDA. The matmuls are not in its ``impls``, so they fall through to ``triton``
  (then ``reference``).

Between the two, and between the fused Triton matmuls and ``apply_mask`` + cuBLAS, the measured
dispatch table of :mod:`supsup_fast.gpu_dispatch` decides per shape class (its documented
defaults until a GPU run has filled one): ``cuda`` declines a class where ``triton`` is faster.
Per-shape choices are O(1) ``check`` functions on tensor metadata.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _native, gpu_dispatch
from .ops import Backend, register_backend

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtypes the pack / unpack kernels read and write (bool travels as uint8)
_BIT_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)
SEEDED_GEMV_MAX_M = 8  # the CUDA seeded GEMV serves at most this many rows
_GRID_Y_LIMIT = 65535  # rows of v map to a grid axis

TRITON_ERROR: Optional[str] = None


def _import_triton_kernels():
    """``(masked_matmul, mask_ops)`` modules, or ``None`` with :data:`TRITON_ERROR` set."""
    global TRITON_ERROR
    try:
        from .kernels import mask_ops, masked_matmul
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
        "masked_conv2d": mo.masked_conv2d,
        "superpose": mo.superpose,
        "mask_dots": mo.mask_dots,
        "masked_linear_grouped": mm.masked_linear_grouped,
        "masked_linear_grouped_grad_input": mm.masked_linear_grouped_grad_input,
        "masked_linear_seeded": mm.masked_linear_seeded,
    }
    return {op: _on_tensor_device(fn) for op, fn in launchers.items()}


def _triton_check(op: str, args: tuple) -> Optional[str]:
    if op == "pack_masks":
        if args[0].dtype not in _BIT_DTYPES:
            return f"cannot read masks of dtype {args[0].dtype}"
        return None
    if op == "unpack_masks":
        if args[2] not in _BIT_DTYPES:
            return f"cannot write masks of dtype {args[2]}"
        return None
    if op == "mask_dots":
        if args[0].dim() == 3 and args[0].shape[0] > _GRID_Y_LIMIT:
            return f"more than {_GRID_Y_LIMIT} rows of v"
    elif op == "masked_weight_grad" and args[2].dtype not in GPU_DTYPES:
        return f"weight dtype {args[2].dtype} is not fp16/bf16/fp32"
    return None


def register_triton(devices: tuple[str, ...] = ("cuda",), priority: int = 20) -> Backend:
    """Register the ``triton`` backend for ``devices`` (unavailable, with the reason, without triton)."""
    try:
        impls = triton_impls()
    except ImportError:
        backend = Backend(name="triton", priority=priority, devices=devices, available=False,
                          why_unavailable=f"triton did not import ({TRITON_ERROR})")
    else:
        backend = Backend(name="triton", priority=priority, devices=devices, impls=impls, dtypes=GPU_DTYPES,
                          check=_triton_check)
    register_backend(backend)
    return backend


# --------------------------------------------------------------------------------------
# CUDA extension
# --------------------------------------------------------------------------------------
def cuda_impls() -> dict:
    """The extension's CUDA ops, keyed by op name (the rest fall through to triton / reference)."""
    C = torch.ops.supsup_fast_C
    return {
        "pack_masks": C.pack_masks.default,
        "unpack_masks": C.unpack_masks.default,
        "superpose": C.superpose.default,
        "mask_dots": C.mask_dots.default,
        "masked_linear_seeded": C.masked_linear_seeded.default,
    }


def _cuda_check(op: str, args: tuple) -> Optional[str]:
    if op == "masked_linear_seeded":
        x = args[0]
        if x.shape[-1] and x.numel() // x.shape[-1] > SEEDED_GEMV_MAX_M:
            return f"more than {SEEDED_GEMV_MAX_M} rows: the tiled Triton GEMM serves"
    elif op == "mask_dots" and args[0].dim() == 3 and args[0].shape[0] > _GRID_Y_LIMIT:
        return f"more than {_GRID_Y_LIMIT} rows of v"
    return _slower_than_triton(op, args)


def _slower_than_triton(op: str, args: tuple) -> Optional[str]:
    """Decline where the dispatch table (or its default) prefers an available ``triton``."""
    from .ops import _BACKENDS

    tr = _BACKENDS.get("triton")
    if tr is None or not tr.available or op not in tr.impls or args[0].device.type != "cuda":
        return None
    if gpu_dispatch.preferred(op, args, ("cuda", "triton")) == "triton":
        return f"triton is faster for {op} [{gpu_dispatch.shape_class(op, args)}] (gpu_dispatch)"
    return None


def signed_constant_fill_(out: torch.Tensor, seed: int, layer: int, scale: float) -> torch.Tensor:
    """Fill a contiguous CUDA tensor with the signed constant ``+-scale`` in place (CUDA extension)."""
    torch.ops.supsup_fast_C.signed_constant_fill_(out, int(seed), int(layer), float(scale))
    return out


def register_cuda(priority: int = 30) -> Backend:
    if _native.ext_has_cuda():
        backend = Backend(name="cuda", priority=priority, devices=("cuda",), impls=cuda_impls(), dtypes=GPU_DTYPES,
                          check=_cuda_check)
    else:
        why = ("compiled extension not loaded" if not _native.EXT_LOADED
               else "the extension was built without CUDA (torch without CUDA or nvcc missing at build time)")
        backend = Backend(name="cuda", priority=priority, devices=("cuda",), available=False, why_unavailable=why)
    register_backend(backend)
    return backend


register_cuda()
if torch.cuda.is_available():
    register_triton()
else:
    register_backend(Backend(name="triton", priority=20, devices=("cuda",), available=False,
                             why_unavailable="no CUDA device (register_triton() registers it for other devices)"))
