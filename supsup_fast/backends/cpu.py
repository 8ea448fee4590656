"""``cpu_ext``: the compiled extension's C++ CPU kernels (``csrc/cpu``)."""

from __future__ import annotations

import torch

from ..ops import Backend
from . import _composite, _shared_alpha
from ._ext import _C, EXT_ERROR, EXT_LOADED

NAME, PRIORITY = "cpu_ext", 10
_F32 = (torch.float32,)


def _impls() -> dict:
    C = torch.ops.supsup_fast_C
    fused_sign = C.masked_weight_grad_sign.default
    times_sign = _composite.weight_grad_times_sign(C.masked_weight_grad.default)

    def masked_weight_grad_sign(grad_out, x, weight, scores):
        # the sign applied in the weight-gradient GEMM's epilogue, when the scores match the weight
        if scores.dtype == weight.dtype:
            return fused_sign(grad_out, x, weight, scores)
        return times_sign(grad_out, x, weight, scores)

    return {
        "pack_masks": C.pack_masks.default,
        "unpack_masks": C.unpack_masks.default,
        "apply_mask": C.apply_mask.default,
        # bound without the dispatcher: same kernel, ~1.3 us less per call (most of a small GEMV)
        "masked_linear": _C.masked_linear_cpu,
        "masked_linear_grad_input": C.masked_linear_grad_input.default,
        "masked_weight_grad": C.masked_weight_grad.default,
        "masked_weight_grad_sign": masked_weight_grad_sign,
        "masked_conv2d": _composite.conv2d_over_apply_mask(C.apply_mask.default),
        # a shared alpha (one-shot inference) from the bank's cached per-weight counts
        "superpose": _shared_alpha.cached(C.superpose.default),
        "mask_dots": C.mask_dots.default,
        "masked_linear_grouped": C.masked_linear_grouped.default,
        "masked_linear_grouped_grad_input": _composite.grouped_grad_input_by_task(C.masked_linear_grad_input.default),
        "masked_linear_seeded": C.masked_linear_seeded.default,
        "signed_constant_fill_": C.signed_constant_fill_.default,
        "seeded_fill_": C.seeded_fill_.default,
        # bound without the dispatcher, as masked_linear (the GIL released)
        "ternary_linear": _C.ternary_linear_cpu,
        "ternary_linear_grad_input": C.ternary_linear_grad_input.default,
        "largest_k": C.largest_k.default,
        "topk_words": C.topk_words.default,
        "threshold_words": C.threshold_words.default,
    }


def backend() -> Backend:
    """The ``cpu_ext`` backend (unavailable, with the reason, without the extension)."""
    if not EXT_LOADED:
        return Backend(name=NAME, priority=PRIORITY, devices=("cpu",), available=False,
                       why_unavailable=f"compiled extension not loaded ({EXT_ERROR})")
    return Backend(
        name=NAME, priority=PRIORITY, devices=("cpu",), impls=_impls(),
        # the binarisers' selections are compiled for float32 scores, the ternary kernels for float32
        op_dtypes={"largest_k": _F32, "topk_words": _F32, "threshold_words": _F32,
                   "ternary_linear": _F32, "ternary_linear_grad_input": _F32},
        # GG inference of a small layer: checks, registry and kernel in one native call
        eager={"ternary_linear": ("cpu", torch.float32, _C.ternary_linear_eager),
               "masked_linear": ("cpu", torch.float32, _C.masked_linear_eager)},
    )


def ternary_isa() -> str:
    """The instruction set the ternary CPU kernels run on here (``avx512``, ``avx2``, ``scalar``), or
    ``none`` without the extension. ``SUPSUP_FAST_NO_AVX512=1`` switches AVX-512 off, as for the
    masked GEMM."""
    return _C.ternary_isa() if EXT_LOADED else "none"
