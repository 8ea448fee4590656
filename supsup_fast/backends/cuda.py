"""``cuda``: the compiled extension's CUDA kernels (``csrc/cuda``), when it was built with CUDA.

It serves the bandwidth-bound ops (pack / unpack, superpose, mask_dots), the signed-constant fill
and the seeded GEMV; the matmuls are not in its table, so they fall through to ``triton`` (then
``reference``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops import Backend
from ._ext import EXT_LOADED, ext_has_cuda
from .triton import GPU_DTYPES, check_mask_dots

NAME, PRIORITY = "cuda", 30
SEEDED_GEMV_MAX_M = 8  # the CUDA seeded GEMV serves at most this many rows


def _impls() -> dict:
    C = torch.ops.supsup_fast_C
    return {
        "pack_masks": C.pack_masks.default,
        "unpack_masks": C.unpack_masks.default,
        "superpose": C.superpose.default,
        "mask_dots": C.mask_dots.default,
        "masked_linear_seeded": C.masked_linear_seeded.default,
        "signed_constant_fill_": C.signed_constant_fill_.default,
    }


def _check_seeded(x, *rest) -> Optional[str]:
    if x.shape[-1] and x.numel() // x.shape[-1] > SEEDED_GEMV_MAX_M:
        return f"more than {SEEDED_GEMV_MAX_M} rows: the tiled Triton GEMM serves"
    return None


def backend() -> Backend:
    """The ``cuda`` backend (unavailable, with the reason, without CUDA kernels in the extension)."""
    if not ext_has_cuda():
        why = ("compiled extension not loaded" if not EXT_LOADED
               else "the extension was built without CUDA (torch without CUDA or nvcc missing at build time)")
        return Backend(name=NAME, priority=PRIORITY, devices=("cuda",), available=False, why_unavailable=why)
    return Backend(name=NAME, priority=PRIORITY, devices=("cuda",), impls=_impls(), dtypes=GPU_DTYPES,
                   checks={"masked_linear_seeded": _check_seeded, "mask_dots": check_mask_dots})
