"""Layers over a signed-constant base in a seed format: ternary weights read as mask words only.

A SupSup layer over a signed-constant base is ternary: ``W * M`` is ``+scale``, ``-scale`` or 0.
Its signs come from the seed (:mod:`supsup_fast.seed_format`) and its mask is one bit per weight,
so a kernel needs the mask words only (1/32 of the float32 layer's bytes).

* ``seeded_fill_(out, seed, layer, scale, format_version)`` -- ``out = +-scale`` in seed format 1 or 2
  (format 1 is ``signed_constant_fill_``);
* ``ternary_linear(x, M, seed, layer, scale, b, format_version=2)`` -- ``x (W * M)^T + b``;
* ``ternary_linear_grad_input(dy, M, k, seed, layer, scale, format_version=2)`` -- ``dL/dx = dy (W * M)``.

The CPU kernel (``csrc/cpu/ternary.cpp``, float32) regenerates 32 signs with one hash in format 2
(32 hashes in format 1), tabulates the 16 partial sums of every group of 4 activations once per
call and reads each row's 4 positive (negative) weights as one table lookup, in a documented
float32 order that no thread count or instruction set changes. The mask and the seed get no
gradient; ``dL/db = sum dL/dy``.
"""

from __future__ import annotations

import math

import torch

from ..config import check_seed
from ..seed_format import SEED_FORMAT_VERSIONS
from ._checks import check_bias, check_float, check_same_device, check_words, flat, require
from ._define import define, on_first
from ._fastpath import call, direct, eager, fast
from ._registry import kernel


def _check_scale(scale) -> None:
    require(not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale),
            lambda: f"scale must be a finite number, got {scale!r}")


def _check_version(format_version) -> None:
    require(not isinstance(format_version, bool) and format_version in SEED_FORMAT_VERSIONS,
            lambda: f"format_version must be one of {SEED_FORMAT_VERSIONS} (the seed formats), got {format_version!r}")


def _check_scalars(seed, layer, scale, format_version) -> None:
    check_seed(seed, "seed")
    check_seed(layer, "layer")
    _check_scale(scale)
    _check_version(format_version)


# ======================================================================================
# seeded_fill_: the base in either seed format
# ======================================================================================
def _check_fill(out, seed, layer, scale, format_version) -> None:
    check_float("out", out)
    require(out.is_contiguous(), "seeded_fill_: out must be contiguous")
    require(out.dim() >= 2, lambda: f"seeded_fill_: out must have at least 2 dims [N, ...], got {tuple(out.shape)}")
    _check_scalars(seed, layer, scale, format_version)


define("seeded_fill_(Tensor(a!) out, int seed, int layer, float scale, int format_version) -> ()", dispatch=on_first,
       fake=lambda out, seed, layer, scale, format_version: None, check=_check_fill)


def seeded_fill_(out: torch.Tensor, seed: int, layer: int, scale: float, format_version: int) -> torch.Tensor:
    """Fill ``out`` (contiguous, float, ``[N, ...]``) with ``+-scale`` in seed format ``format_version``."""
    _check_fill(out, seed, layer, scale, format_version)
    call("seeded_fill_", out, int(seed), int(layer), float(scale), int(format_version))
    return out


# ======================================================================================
# ternary_linear and its input gradient
# ======================================================================================
_U32 = 1 << 32


def _check_ternary(x, mask_words, seed, layer, scale, bias, format_version=2) -> None:
    # the common case in one expression (this runs on every call of a small layer); a failure
    # re-runs the checks that name the problem
    if (type(seed) is int and type(layer) is int and 0 <= seed < _U32 and 0 <= layer < _U32
            and type(scale) is float and math.isfinite(scale) and format_version in (1, 2)
            and type(format_version) is int and isinstance(x, torch.Tensor) and x.is_floating_point()
            and x.dim() >= 1 and isinstance(mask_words, torch.Tensor) and mask_words.dtype == torch.int32
            and mask_words.dim() == 2 and mask_words.shape[1] == (x.shape[-1] + 31) >> 5
            and ((x.is_cpu and mask_words.is_cpu) or mask_words.device == x.device)
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (mask_words.shape[0],)
                                  and bias.dtype == x.dtype
                                  and ((x.is_cpu and bias.is_cpu) or bias.device == x.device)))):
        return
    check_float("x", x)
    require(x.dim() >= 1, lambda: f"x needs at least 1 dim [..., K], got shape {tuple(x.shape)}")
    require(isinstance(mask_words, torch.Tensor) and mask_words.dim() == 2,
            lambda: f"mask_words must be [N, ceil(K/32)] int32 words, got {getattr(mask_words, 'shape', mask_words)}")
    check_words("mask_words", mask_words, mask_words.shape[0], x.shape[-1], 0)
    _check_scalars(seed, layer, scale, format_version)
    check_bias(bias, mask_words.shape[0], x.dtype)
    check_same_device(x=x, mask_words=mask_words, bias=bias)


def _ternary_fake(x, mask_words, seed, layer, scale, bias, format_version=2):
    return x.new_empty((*x.shape[:-1], mask_words.shape[0]))


def _ternary_setup(ctx, inputs, output):
    x, mask_words, seed, layer, scale, bias, format_version = inputs
    ctx.save_for_backward(mask_words)
    ctx.conf = (x.shape[-1], seed, layer, scale, format_version)
    ctx.has_bias = bias is not None


def _ternary_bwd(ctx, grad):
    (mask_words,) = ctx.saved_tensors
    k, seed, layer, scale, version = ctx.conf
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = fast.ternary_linear_grad_input(grad.contiguous(), mask_words, k, seed, layer, scale, version)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = flat(grad).sum(0)
    return gx, None, None, None, None, gb, None


define("ternary_linear(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias, "
       "int format_version) -> Tensor",
       dispatch=on_first, fake=_ternary_fake, backward=_ternary_bwd, setup_context=_ternary_setup,
       check=_check_ternary)


def ternary_linear(x, mask_words, seed: int, layer: int, scale: float, bias=None, format_version: int = 2):
    """``y = x (W * M)^T + b`` with ``W [N, K] = +-scale``, its signs in seed format ``format_version``.

    ``x [..., K]``; ``mask_words`` one task's packed mask ``[N, ceil(K/32)]`` (int32); ``bias [N]``.
    ``scale`` is usually ``gain / sqrt(K)`` (:func:`supsup_fast.base_weights.signed_constant`'s).
    The weight is never materialised on the compiled CPU backend (float32); the reference (any
    device and dtype) forms ``W * M`` and calls ``F.linear``.
    """
    if type(scale) is int:
        scale = float(scale)
    # a small layer's GG inference: one native call where it can be
    y = eager("ternary_linear", x, mask_words, seed, layer, scale, bias, format_version)
    if y is not None:
        return y
    _check_ternary(x, mask_words, seed, layer, scale, bias, format_version)
    args = (x, mask_words, seed, layer, scale, bias, format_version)
    if direct(args):  # call("ternary_linear", ...), inlined
        return kernel("ternary_linear", args)(*args)
    return call("ternary_linear", *args)


def _check_grad_input(grad_out, mask_words, k, seed, layer, scale, format_version=2) -> None:
    check_float("grad_out", grad_out)
    require(not isinstance(k, bool) and isinstance(k, int) and k >= 0, lambda: f"k must be an int >= 0, got {k!r}")
    require(isinstance(mask_words, torch.Tensor) and mask_words.dim() == 2,
            lambda: f"mask_words must be [N, ceil(K/32)] int32 words, got {getattr(mask_words, 'shape', mask_words)}")
    check_words("mask_words", mask_words, mask_words.shape[0], k, 0)
    require(grad_out.dim() >= 1 and grad_out.shape[-1] == mask_words.shape[0],
            lambda: f"grad_out has shape {tuple(grad_out.shape)}; its last dim must be N={mask_words.shape[0]}")
    _check_scalars(seed, layer, scale, format_version)
    check_same_device(grad_out=grad_out, mask_words=mask_words)


def _grad_input_fake(grad_out, mask_words, k, seed, layer, scale, format_version=2):
    return grad_out.new_empty((*grad_out.shape[:-1], k))


define("ternary_linear_grad_input(Tensor grad_out, Tensor mask_words, int k, int seed, int layer, float scale, "
       "int format_version) -> Tensor",
       dispatch=on_first, fake=_grad_input_fake, check=_check_grad_input)


def ternary_linear_grad_input(grad_out, mask_words, k: int, seed: int, layer: int, scale: float,
                              format_version: int = 2):
    """``dL/dx = dL/dy (W * M)``: ``grad_out [..., N]`` -> ``[..., k]``."""
    if type(scale) is int:
        scale = float(scale)
    _check_grad_input(grad_out, mask_words, k, seed, layer, scale, format_version)
    return call("ternary_linear_grad_input", grad_out, mask_words, int(k), int(seed), int(layer), float(scale),
                int(format_version))
