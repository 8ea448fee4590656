"""One task's mask on a 2-D convolution: ``conv2d(x, W * M) + b``, the mask over ``W``'s
``[O, I/g * kh * kw]`` view."""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_bias, check_float, check_same_device, check_words, gemm_nk, require
from ._define import define, on_first
from ._fastpath import call, direct, fast, plain_eager
from ._registry import kernel


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_fake(x, weight, mask_words, bias, stride, padding, dilation, groups):
    h = _conv_out(x.shape[-2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[-1], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((*x.shape[:-3], weight.shape[0], h, w))


def _conv_setup(ctx, inputs, output):
    x, weight, mask_words, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, mask_words)
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_shape = None if bias is None else list(bias.shape)


def _conv_bwd(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    w_eff = fast.apply_mask(weight, mask_words)
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, w_eff, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups,
        [need[0], need[1], ctx.bias_shape is not None and need[3]],
    )
    if gw is not None:
        gw = fast.apply_mask(gw, mask_words)
    return gx, gw, None, gb, None, None, None, None


def _check_conv(x, weight, mask_words, bias, stride, padding, dilation, groups) -> None:
    check_float("x", x)
    check_float("weight", weight)
    require(weight.dim() == 4,
            lambda: f"masked_conv2d weight must be [O, I/g, kh, kw], got shape {tuple(weight.shape)}")
    require(x.dim() in (3, 4), lambda: f"masked_conv2d input must be [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    require(not isinstance(groups, bool) and isinstance(groups, int) and groups >= 1,
            lambda: f"masked_conv2d: groups must be a positive int, got {groups!r}")
    for name, v, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        require(len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool) and a >= least for a in v),
                lambda name=name, v=v, least=least: f"masked_conv2d: {name} must be two ints >= {least}, got {v!r}")
    require(x.shape[-3] == weight.shape[1] * groups,
            lambda: f"x has {x.shape[-3]} channels, weight expects {weight.shape[1] * groups} (groups={groups})")
    n, k = gemm_nk(weight)
    check_words("mask_words", mask_words, n, k, 0)
    check_bias(bias, weight.shape[0], x.dtype)
    check_same_device(x=x, weight=weight, mask_words=mask_words, bias=bias)


define("masked_conv2d(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias, int[2] stride, int[2] padding, "
       "int[2] dilation, int groups) -> Tensor",
       dispatch=on_first, fake=_conv_fake, backward=_conv_bwd, setup_context=_conv_setup, check=_check_conv)


class _MaskedConv2dEager(torch.autograd.Function):
    """``masked_conv2d``'s autograd for plain eager tensors, without the dispatcher's autograd
    wrapper (the kernel is the registry's, the backward is the op's own). See :mod:`._fastpath`."""

    @staticmethod
    def forward(ctx, x, weight, mask_words, bias, stride, padding, dilation, groups, kernel: Callable):
        _conv_setup(ctx, (x, weight, mask_words, bias, stride, padding, dilation, groups), None)
        return kernel(x, weight, mask_words, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        return (*_conv_bwd(ctx, grad), None)


def _pair(name: str, v) -> list:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    require(isinstance(v, (tuple, list)) and len(v) == 2, lambda: f"masked_conv2d: {name} must be an int or a pair, "
            f"got {v!r}")
    return list(v)


def masked_conv2d(x, weight, mask_words, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv2d(x, W * M) + b`` for one task's packed mask."""
    args = (x, weight, mask_words, bias, _pair("stride", stride), _pair("padding", padding),
            _pair("dilation", dilation), groups)
    _check_conv(*args)
    if direct(args):  # nothing for autograd to record
        return kernel("masked_conv2d", args)(*args)
    if plain_eager(args):
        return _MaskedConv2dEager.apply(*args, kernel("masked_conv2d", args))
    return call("masked_conv2d", *args)
