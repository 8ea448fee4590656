"""``cuda``: the compiled extension's CUDA kernels (``csrc/cuda``), when it was built with CUDA.

It serves the bandwidth-bound ops (pack / unpack, superpose, mask_dots), the signed-constant fill
and the seeded GEMV; the matmuls are not in its table, so they fall through to ``triton`` (then
``reference``). Where both could serve, the measured dispatch table of :mod:`.gpu_dispatch` decides
per shape class: ``cuda`` declines a class where ``triton`` is faster.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..ops import Backend
from . import gpu_dispatch
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


def _slower_than_triton(op: str, args: tuple) -> Optional[str]:
    """Decline where the dispatch table (or its default) prefers an available ``triton``."""
    tr = {b.name: b for b in ops.backends()}.get("triton")
    if tr is None or not tr.available or op not in tr.impls or args[0].device.type != "cuda":
        return None
    if gpu_dispatch.preferred(op, args, ("cuda", "triton")) == "triton":
        return f"triton is faster for {op} [{gpu_dispatch.shape_class(op, args)}] (gpu_dispatch)"
    return None


def _checks(impls: dict) -> dict:
    """Every op: its own limits first, then the dispatch table's verdict against ``triton``."""
    own = {"masked_linear_seeded": _check_seeded, "mask_dots": check_mask_dots}

    def check_for(op):
        def check(*args) -> Optional[str]:
            first = own.get(op)
            why = first(*args) if first is not None else None
            return why if why is not None else _slower_than_triton(op, args)
        return check

    return {op: check_for(op) for op in impls}


def backend() -> Backend:
    """The ``cuda`` backend (unavailable, with the reason, without CUDA kernels in the extension)."""
    if not ext_has_cuda():
        why = ("compiled extension not loaded" if not EXT_LOADED
               else "the extension was built without CUDA (torch without CUDA or nvcc missing at build time)")
        return Backend(name=NAME, priority=PRIORITY, devices=("cuda",), available=False, why_unavailable=why)
    impls = _impls()
    return Backend(name=NAME, priority=PRIORITY, devices=("cuda",), impls=impls, dtypes=GPU_DTYPES,
                   checks=_checks(impls))
