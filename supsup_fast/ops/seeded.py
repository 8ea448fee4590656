"""The signed-constant base regenerated from its seed: the fill, and a masked linear layer that
never stores its weight.

* ``signed_constant_fill_(out, seed, layer, scale)`` -- ``out[i] = +-scale``, the sign of weight
  ``i`` (row-major) from the hash of :mod:`supsup_fast.base_weights`;
* ``masked_linear_seeded(x, M, seed, layer, scale, b)`` -- ``masked_linear`` with that weight.

``seed`` and ``layer`` are ints in ``[0, 2**32)`` (:data:`supsup_fast.config.SEED_RANGE`): the hash
reads 32 bits of each, so any other value would name the base of its residue under another name.
The schemas take ``int`` (int64); every call, through the Python functions below or through
``torch.ops.supsup_fast.*`` directly, is checked before a kernel runs (the ops' dispatch keys).
"""

from __future__ import annotations

import math

import torch

from ..config import check_seed
from ._checks import check_bias, check_float, check_same_device, check_words, flat, require
from ._define import define, on_first
from ._fastpath import call, fast


def _check_scale(scale) -> None:
    require(not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale),
            lambda: f"scale must be a finite number, got {scale!r}")


def _check_fill(out, seed, layer, scale) -> None:
    check_float("out", out)
    require(out.is_contiguous(), "signed_constant_fill_: out must be contiguous")
    check_seed(seed, "seed")
    check_seed(layer, "layer")
    _check_scale(scale)


define("signed_constant_fill_(Tensor(a!) out, int seed, int layer, float scale) -> ()", dispatch=on_first,
       fake=lambda out, seed, layer, scale: None, check=_check_fill)


def signed_constant_fill_(out: torch.Tensor, seed: int, layer: int, scale: float) -> torch.Tensor:
    """Fill the contiguous float tensor ``out`` with the signed constant ``+-scale`` in place; returns ``out``."""
    _check_fill(out, seed, layer, scale)
    call("signed_constant_fill_", out, int(seed), int(layer), float(scale))
    return out


def _seeded_fake(x, mask_words, seed, layer, scale, bias):
    return x.new_empty((*x.shape[:-1], mask_words.shape[0]))


def _seeded_setup(ctx, inputs, output):
    x, mask_words, seed, layer, scale, bias = inputs
    ctx.save_for_backward(mask_words)
    ctx.conf = (seed, layer, scale, x.shape[-1], x.dtype)
    ctx.has_bias = bias is not None


def _seeded_bwd(ctx, grad):
    (mask_words,) = ctx.saved_tensors
    seed, layer, scale, k, dtype = ctx.conf
    gx = gb = None
    if ctx.needs_input_grad[0]:
        weight = torch.empty(mask_words.shape[0], k, dtype=dtype, device=grad.device)
        fast.signed_constant_fill_(weight, seed, layer, scale)
        gx = fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = flat(grad).sum(0)
    return gx, None, None, None, None, gb


def _check_seeded(x, mask_words, seed, layer, scale, bias) -> None:
    check_float("x", x)
    require(x.dim() >= 1, lambda: f"x needs at least 1 dim [..., K], got shape {tuple(x.shape)}")
    require(isinstance(mask_words, torch.Tensor) and mask_words.dim() == 2,
            lambda: f"mask_words must be [N, ceil(K/32)] int32 words, got {getattr(mask_words, 'shape', mask_words)}")
    check_words("mask_words", mask_words, mask_words.shape[0], x.shape[-1], 0)
    check_seed(seed, "seed")
    check_seed(layer, "layer")
    _check_scale(scale)
    check_bias(bias, mask_words.shape[0], x.dtype)
    check_same_device(x=x, mask_words=mask_words, bias=bias)


define("masked_linear_seeded(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias) -> Tensor",
       dispatch=on_first, fake=_seeded_fake, backward=_seeded_bwd, setup_context=_seeded_setup, check=_check_seeded)


def masked_linear_seeded(x, mask_words, seed: int, layer: int, scale: float, bias=None):
    """``masked_linear`` with the signed-constant weight ``+-scale`` regenerated from ``(seed, layer)``."""
    _check_seeded(x, mask_words, seed, layer, scale, bias)
    seed, layer = int(seed), int(layer)
    return call("masked_linear_seeded", x, mask_words, seed, layer, float(scale), bias)
