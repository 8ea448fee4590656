"""Ternary linear layers: ``y = x (W * M)^T + b`` with ``W = +-scale`` regenerated from a seed.

A SupSup layer over a signed-constant base is ternary: ``W * M`` is ``+scale``, ``-scale`` or 0.
Its signs come from the seed (:mod:`supsup_fast.seed_format`) and its mask is one bit per weight,
so the kernel reads 1/32 of the bytes of the float32 layer it replaces: the mask words only.

On CPU (float32, compiled extension) :func:`ternary_linear` runs the ``supsup_fast_C::ternary_linear``
kernel (``csrc/cpu/ternary.cpp``): the signs of 32 weights are one hash in seed format 2 (32 hashes
in format 1, which still works, more slowly); per group of 4 activations the 16 partial sums are
tabulated once per call and each row's 4 positive (negative) weights are one table lookup. Its
float32 order is fixed and documented there, so its result does not depend on the thread count or
the instruction set (AVX-512 where the CPU has it and ``SUPSUP_FAST_NO_AVX512`` is unset, as for
the masked GEMM; else AVX2; else scalar: :func:`kernel_isa` says which). Elsewhere, and for other
dtypes, the reference twin :func:`ternary_linear_reference` (materialise ``W * M``, then
``F.linear``) serves.

Gradients: ``dL/dx = dL/dy (W * M)`` through ``supsup_fast_C::ternary_linear_grad_input`` (the same
regenerated signs, column by column), ``dL/db = sum dL/dy``; the mask and the seed get none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference, seed_format
from ._native import EXT_LOADED, _C
from .errors import SupsupError
from .format import words_per_row

__all__ = [
    "ternary_linear", "ternary_linear_grad_input", "ternary_linear_reference",
    "ternary_linear_grad_input_reference", "kernel_isa",
]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------------------
# Reference twins (the executable specification)
# --------------------------------------------------------------------------------------
def _weight(seed, layer, n, k, scale, dtype, device, format_version):
    return seed_format.signed_constant_from_scale(seed, layer, n, k, scale, dtype, device, format_version)


def ternary_linear_reference(x, mask_words, seed: int, layer: int, scale: float, bias=None, format_version: int = 2):
    """``F.linear(x, W * M, bias)`` with ``W`` the ``[N, K]`` signed constant ``+-scale`` materialised."""
    w = _weight(seed, layer, mask_words.shape[0], x.shape[-1], scale, x.dtype, x.device, format_version)
    return F.linear(x, reference.apply_mask(w, mask_words), bias)


def ternary_linear_grad_input_reference(grad_out, mask_words, k: int, seed: int, layer: int, scale: float,
                                        format_version: int = 2):
    """``dL/dx = dL/dy (W * M)``."""
    w = _weight(seed, layer, mask_words.shape[0], k, scale, grad_out.dtype, grad_out.device, format_version)
    return grad_out @ reference.apply_mask(w, mask_words)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def _fail(msg: str):
    raise SupsupError(f"ternary_linear: {msg}")


def _check_scalars(seed, layer, scale, format_version):
    for name, v in (("seed", seed), ("layer", layer)):
        if isinstance(v, bool) or not isinstance(v, int):
            _fail(f"{name} must be an int, got {type(v).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(f"scale must be a finite float, got {scale!r}")
    try:
        seed_format.check_version(format_version)
    except ValueError as e:
        raise SupsupError(f"ternary_linear: {e}") from None


def _check_words(mask_words, k):
    if not isinstance(mask_words, torch.Tensor) or mask_words.dtype != torch.int32 or mask_words.dim() != 2:
        got = f"{mask_words.dtype} of shape {tuple(mask_words.shape)}" if isinstance(mask_words, torch.Tensor) \
            else type(mask_words).__name__
        _fail(f"mask_words must be int32 packed words [N, ceil(K/32)], got {got}")
    if mask_words.shape[1] != words_per_row(k):
        _fail(f"mask_words has shape {tuple(mask_words.shape)}, expected [{mask_words.shape[0]}, {words_per_row(k)}] "
              f"for K={k}")


def _check(x, mask_words, seed, layer, scale, bias, format_version):
    # the common case in one expression; a failure re-runs the checks that name the problem
    if (type(seed) is int and type(layer) is int and type(scale) is float and format_version in (1, 2)
            and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1
            and isinstance(mask_words, torch.Tensor) and mask_words.dtype == torch.int32
            and mask_words.dim() == 2 and mask_words.shape[1] == (x.shape[-1] + 31) >> 5
            and mask_words.device == x.device and math.isfinite(scale)
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (mask_words.shape[0],)
                                  and bias.dtype == x.dtype and bias.device == x.device))):
        return
    _check_scalars(seed, layer, scale, format_version)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        _fail(f"x must be a floating tensor [..., K], got {getattr(x, 'dtype', type(x).__name__)}")
    _check_words(mask_words, x.shape[-1])
    n = mask_words.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
            _fail(f"bias must have shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != x.dtype:
            _fail(f"bias dtype {bias.dtype} != x dtype {x.dtype}")
    devices = {t.device for t in (x, mask_words, bias) if t is not None}
    if len(devices) > 1:
        _fail(f"tensors are on different devices: {sorted(str(d) for d in devices)}")


def _traced() -> bool:
    # torch.compile, a dispatch mode or a functorch transform must see the op, not the bound kernel
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active())


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------
def ternary_linear(x, mask_words, seed: int, layer: int, scale: float, bias=None, format_version: int = 2):
    """``y = x (W * M)^T + b`` with ``W [N, K] = +-scale``, signs in seed format ``format_version``.

    ``x [..., K]``; ``mask_words`` one task's packed mask ``[N, ceil(K/32)]`` (int32); ``bias [N]``.
    ``scale`` is usually ``gain / sqrt(K)`` (see :func:`supsup_fast.seed_format.signed_constant`).
    float32 on CPU runs the compiled kernel (fixed float32 order, thread-count independent);
    float16/bfloat16/float64, other devices or a missing extension run
    :func:`ternary_linear_reference` in ``x``'s dtype.
    """
    kernel = EXT_LOADED and isinstance(x, torch.Tensor) and x.dtype is torch.float32 and x.is_cpu
    if kernel and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))) \
            and type(x) in _PLAIN and (bias is None or type(bias) in _PLAIN) and not _traced():
        # nothing for autograd to record: the kernel bound without the dispatcher (~2 us less a
        # call), and it checks its inputs itself; on a refusal the checks below name the problem
        try:
            return _C.ternary_linear_cpu(x, mask_words, seed, layer, scale, bias, format_version)
        except (RuntimeError, TypeError):
            _check(x, mask_words, seed, layer, scale, bias, format_version)
            raise
    if type(scale) is int:
        scale = float(scale)
    _check(x, mask_words, seed, layer, scale, bias, format_version)
    if not kernel:
        return ternary_linear_reference(x, mask_words, seed, layer, scale, bias, format_version)
    return torch.ops.supsup_fast_C.ternary_linear(x, mask_words, seed, layer, scale, bias, format_version)


def ternary_linear_grad_input(grad_out, mask_words, k: int, seed: int, layer: int, scale: float,
                              format_version: int = 2):
    """``dL/dx = dL/dy (W * M)``: ``grad_out [..., N]`` -> ``[..., k]``."""
    scale = float(scale) if type(scale) is int else scale
    _check_scalars(seed, layer, scale, format_version)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        _fail(f"k must be a non-negative int, got {k!r}")
    if not isinstance(grad_out, torch.Tensor) or not grad_out.is_floating_point() or grad_out.dim() < 1:
        _fail(f"grad_out must be a floating tensor [..., N], got {getattr(grad_out, 'dtype', type(grad_out).__name__)}")
    _check_words(mask_words, k)
    if grad_out.shape[-1] != mask_words.shape[0]:
        _fail(f"grad_out has shape {tuple(grad_out.shape)}; its last dim must be N={mask_words.shape[0]}")
    if grad_out.device != mask_words.device:
        _fail(f"grad_out is on {grad_out.device}, mask_words on {mask_words.device}")
    if EXT_LOADED and grad_out.dtype is torch.float32 and grad_out.is_cpu:
        return torch.ops.supsup_fast_C.ternary_linear_grad_input(grad_out, mask_words, k, seed, layer, scale,
                                                                 format_version)
    return ternary_linear_grad_input_reference(grad_out, mask_words, k, seed, layer, scale, format_version)


def kernel_isa() -> str:
    """The instruction set the CPU kernel runs on here: ``avx512``, ``avx2``, ``scalar``, or ``none``."""
    return _C.ternary_isa() if EXT_LOADED else "none"


# --------------------------------------------------------------------------------------
# torch.library registrations of the C++ ops (shapes for tracing, autograd)
# --------------------------------------------------------------------------------------
if EXT_LOADED:

    @torch.library.register_fake("supsup_fast_C::ternary_linear")
    def _ternary_linear_fake(x, mask_words, seed, layer, scale, bias, format_version=2):
        torch._check(x.dtype == torch.float32, lambda: "ternary_linear: x must be float32")
        return x.new_empty((*x.shape[:-1], mask_words.shape[0]))

    @torch.library.register_fake("supsup_fast_C::ternary_linear_grad_input")
    def _ternary_linear_grad_input_fake(grad_out, mask_words, k, seed, layer, scale, format_version=2):
        torch._check(grad_out.dtype == torch.float32, lambda: "ternary_linear_grad_input: grad_out must be float32")
        return grad_out.new_empty((*grad_out.shape[:-1], k))

    def _setup(ctx, inputs, output):
        x, mask_words, seed, layer, scale, bias, format_version = inputs
        ctx.save_for_backward(mask_words)
        ctx.conf = (x.shape[-1], seed, layer, scale, format_version, bias is not None)

    def _backward(ctx, grad):
        (mask_words,) = ctx.saved_tensors
        k, seed, layer, scale, version, has_bias = ctx.conf
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.supsup_fast_C.ternary_linear_grad_input(grad.contiguous(), mask_words, k, seed, layer,
                                                                   scale, version)
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and ctx.needs_input_grad[5] else None
        return gx, None, None, None, None, gb, None

    torch.library.register_autograd("supsup_fast_C::ternary_linear", _backward, setup_context=_setup)
