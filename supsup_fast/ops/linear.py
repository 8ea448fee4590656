"""One task's mask on a linear layer: ``W * M``, ``y = x (W * M)^T + b`` and their gradients.

Ops (each block below: schema, fake kernel, autograd, public wrapper):

* ``apply_mask(W, M)`` -- ``W * M``;
* ``masked_linear(x, W, M, b)`` -- ``x (W * M)^T + b``;
* ``masked_linear_grad_input(dy, W, M)`` -- ``dL/dx = dy (W * M)``;
* ``masked_weight_grad(dy, x, W)`` -- the straight-through score gradient ``(dy^T x) * W``;
* ``masked_weight_grad_sign(dy, x, W, S)`` -- the same times ``sign(S)`` (the top-k binariser's);
* carriers ``apply_mask_st`` / ``masked_linear_st``: the same forward, with the mask's scores ``S``
  as an extra argument so autograd routes ``dL/dM`` (times the binariser's straight-through
  derivative, ``1`` or ``sign(S)``) into ``S`` -- training a supermask without a float mask.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..format import words_per_row
from . import _autocast
from ._checks import check_bias, check_float, check_same_device, check_scores, check_words, flat, gemm_nk, require
from ._define import define, on_first
from ._fastpath import call, direct, eager, fast, plain_eager
from ._registry import FLOAT_DTYPES, kernel


def _like_weight(weight, *rest):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _dense_weight_grad(grad_out, x):
    """``dL/dW_eff = dL/dy^T x`` over all leading dims."""
    return flat(grad_out).t() @ flat(x)


def _bias_grad(grad_out):
    return flat(grad_out).sum(0)


# ======================================================================================
# apply_mask: W * M
# ======================================================================================
def _apply_mask_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _apply_mask_bwd(ctx, grad):
    weight, mask_words = ctx.saved_tensors
    return fast.apply_mask(grad, mask_words), None


def _check_apply_mask(weight, mask_words) -> None:
    check_float("weight", weight)
    n, k = gemm_nk(weight)
    check_words("mask_words", mask_words, n, k, 0)
    check_same_device(weight=weight, mask_words=mask_words)


define("apply_mask(Tensor weight, Tensor mask_words) -> Tensor", dispatch=on_first, fake=_like_weight,
       backward=_apply_mask_bwd, setup_context=_apply_mask_setup, check=_check_apply_mask)


def _apply_mask_st_setup(ctx, inputs, output):
    weight, mask_words, scores, score_sign = inputs
    ctx.score_sign = score_sign
    ctx.save_for_backward(weight, mask_words, scores if score_sign else None)


def _apply_mask_st_bwd(ctx, grad):
    weight, mask_words, scores = ctx.saved_tensors
    # straight-through: d(W*M)/dM = W, and dM/dS = 1 (threshold) or sign(S) (top-k, through |S|)
    gs = gw = None
    if ctx.needs_input_grad[2]:
        gs = grad * weight
        gs = gs * scores.sign() if ctx.score_sign else gs
    if ctx.needs_input_grad[0]:  # a weight that is trained too (SupSup's is frozen)
        gw = fast.apply_mask(grad.contiguous(), mask_words)
    return gw, None, gs, None


def _check_apply_mask_st(weight, mask_words, scores, score_sign=False) -> None:
    _check_apply_mask(weight, mask_words)
    check_scores(scores, weight)
    check_same_device(weight=weight, scores=scores)


define("apply_mask_st(Tensor weight, Tensor mask_words, Tensor scores, bool score_sign=False) -> Tensor",
       kernel_of=("apply_mask", lambda a: (a[0], a[1])), fake=_like_weight,
       backward=_apply_mask_st_bwd, setup_context=_apply_mask_st_setup, check=_check_apply_mask_st)


def apply_mask(weight: torch.Tensor, mask_words: torch.Tensor, scores=None, score_sign: bool = False) -> torch.Tensor:
    """``W * M``. With ``scores``, gradients flow straight through to them (training):
    ``dL/dscores = dL/d(W*M) * W``, times ``sign(scores)`` with ``score_sign`` (see :func:`masked_linear`)."""
    if scores is None:
        _check_apply_mask(weight, mask_words)
        return call("apply_mask", weight, mask_words)
    _check_apply_mask_st(weight, mask_words, scores)
    return call("apply_mask_st", weight, mask_words, scores, bool(score_sign))


# ======================================================================================
# The gradients' ops
# ======================================================================================
def _grad_input_fake(grad_out, weight, mask_words):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


def _grad_input_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grad_input_bwd(ctx, gg):
    # grad_out @ (W*M) is linear in grad_out: its vector-Jacobian product is gg @ (W*M)^T
    grad_out, weight, mask_words = ctx.saved_tensors
    return fast.masked_linear(gg, weight, mask_words, None), None, None


def _check_grad_input(grad_out, weight, mask_words) -> None:
    check_float("grad_out", grad_out)
    check_float("weight", weight)
    require(weight.dim() == 2, lambda: f"weight must be [N, K], got shape {tuple(weight.shape)}")
    require(grad_out.dtype == weight.dtype, lambda: f"grad_out dtype {grad_out.dtype} != weight dtype {weight.dtype}")
    require(grad_out.dim() >= 1 and grad_out.shape[-1] == weight.shape[0],
            lambda: f"grad_out has shape {tuple(grad_out.shape)}; its last dim must be N={weight.shape[0]}")
    check_words("mask_words", mask_words, weight.shape[0], weight.shape[1], 0)
    check_same_device(grad_out=grad_out, weight=weight, mask_words=mask_words)


define("masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask_words) -> Tensor",
       dispatch=on_first, fake=_grad_input_fake, backward=_grad_input_bwd, setup_context=_grad_input_setup,
       check=_check_grad_input)


def _weight_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _weight_grad_double_bwd(grad_out, x, v, need):
    # (g^T x) * V is bilinear in (g, x): d/dg = x (gg*V)^T, d/dx = g (gg*V)
    gg_out = (flat(x) @ v.t().to(x.dtype)).reshape(grad_out.shape) if need[0] else None
    gx = (flat(grad_out) @ v.to(grad_out.dtype)).reshape(x.shape) if need[1] else None
    return gg_out, gx


def _weight_grad_bwd(ctx, gg):
    grad_out, x, weight = ctx.saved_tensors
    return (*_weight_grad_double_bwd(grad_out, x, gg * weight, ctx.needs_input_grad), None)


def _check_weight_grad(grad_out, x, weight, scores=None) -> None:
    check_float("grad_out", grad_out)
    check_float("x", x)
    check_float("weight", weight)
    n, k = gemm_nk(weight)
    require(grad_out.dim() >= 1 and grad_out.shape[-1] == n,
            lambda: f"grad_out has shape {tuple(grad_out.shape)}; its last dim must be N={n}")
    require(x.dim() >= 1 and x.shape[-1] == k, lambda: f"x has shape {tuple(x.shape)}; its last dim must be K={k}")
    require(grad_out.numel() // max(n, 1) == x.numel() // max(k, 1),
            lambda: f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} have different numbers of rows")
    if scores is not None:
        check_scores(scores, weight)
    check_same_device(grad_out=grad_out, x=x, weight=weight, scores=scores)


define("masked_weight_grad(Tensor grad_out, Tensor x, Tensor weight) -> Tensor", dispatch=on_first,
       fake=lambda grad_out, x, weight: _like_weight(weight), backward=_weight_grad_bwd,
       setup_context=_weight_grad_setup, check=_check_weight_grad)


def _weight_grad_sign_bwd(ctx, gg):
    grad_out, x, weight, scores = ctx.saved_tensors  # sign(S) is piecewise constant: no gradient to S
    return (*_weight_grad_double_bwd(grad_out, x, gg * weight * scores.sign(), ctx.needs_input_grad), None, None)


define("masked_weight_grad_sign(Tensor grad_out, Tensor x, Tensor weight, Tensor scores) -> Tensor",
       dispatch=on_first, fake=lambda grad_out, x, weight, scores: _like_weight(weight),
       backward=_weight_grad_sign_bwd, setup_context=_weight_grad_setup, check=_check_weight_grad)


def masked_linear_grad_input(grad_out, weight, mask_words):
    """``dL/dx = dL/dy (W * M)``."""
    _check_grad_input(grad_out, weight, mask_words)
    return call("masked_linear_grad_input", grad_out, weight, mask_words)


def masked_weight_grad(grad_out, x, weight):
    """Straight-through score gradient ``(dL/dy^T x) * W``."""
    _check_weight_grad(grad_out, x, weight)
    return call("masked_weight_grad", grad_out, x, weight)


def masked_weight_grad_sign(grad_out, x, weight, scores):
    """The top-k binariser's score gradient ``(dL/dy^T x) * W * sign(S)``."""
    _check_weight_grad(grad_out, x, weight, scores)
    return call("masked_weight_grad_sign", grad_out, x, weight, scores)


# ======================================================================================
# masked_linear: y = x (W * M)^T + b
# ======================================================================================
def _linear_fake(x, weight, mask_words, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, mask_words = inputs[:3]
    ctx.save_for_backward(x, weight, mask_words)
    ctx.has_bias = inputs[-1] is not None


def _linear_bwd(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.needs_input_grad[1]:
        gw = fast.apply_mask(_dense_weight_grad(grad, x).to(weight.dtype), mask_words)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = _bias_grad(grad)
    return gx, gw, None, gb


define("masked_linear(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias) -> Tensor", dispatch=on_first,
       fake=_linear_fake, backward=_linear_bwd, setup_context=_linear_setup, check=lambda *a: _check_linear(*a))


def _linear_st_setup(ctx, inputs, output):
    x, weight, mask_words, scores, bias, score_sign = inputs
    ctx.save_for_backward(x, weight, mask_words, scores if score_sign else None)
    ctx.has_bias, ctx.score_sign = bias is not None, score_sign


def _linear_st_bwd(ctx, grad):
    x, weight, mask_words, scores = ctx.saved_tensors
    gx = gw = gs = gb = None
    if ctx.needs_input_grad[0]:
        gx = fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.needs_input_grad[1]:  # a weight that is trained too (SupSup's is frozen)
        gw = fast.apply_mask(_dense_weight_grad(grad, x).to(weight.dtype), mask_words)
    if ctx.needs_input_grad[3]:
        gs = (fast.masked_weight_grad_sign(grad, x, weight, scores) if ctx.score_sign
              else fast.masked_weight_grad(grad, x, weight))
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = _bias_grad(grad)
    return gx, gw, None, gs, gb, None


define("masked_linear_st(Tensor x, Tensor weight, Tensor mask_words, Tensor scores, Tensor? bias, "
       "bool score_sign=False) -> Tensor",
       kernel_of=("masked_linear", lambda a: (a[0], a[1], a[2], a[4])), fake=_linear_fake,
       backward=_linear_st_bwd, setup_context=_linear_st_setup,
       check=lambda x, weight, mask_words, scores, bias, score_sign=False: _check_linear_st(x, weight, mask_words,
                                                                                             scores, bias))


class _MaskedLinearST(torch.autograd.Function):
    """``masked_linear_st``'s autograd for plain eager tensors, without the dispatcher's autograd
    wrapper (the kernel is the registry's, the backward is the op's own): ~25 us less per training
    forward and backward, which is most of a small layer's cost. See :mod:`._fastpath`."""

    @staticmethod
    def forward(ctx, x, weight, mask_words, scores, bias, score_sign, kernel: Callable):
        _linear_st_setup(ctx, (x, weight, mask_words, scores, bias, score_sign), None)
        return kernel(x, weight, mask_words, bias)

    @staticmethod
    def backward(ctx, grad):
        return (*_linear_st_bwd(ctx, grad), None)


def _check_linear(x, weight, mask_words, bias):
    # the common case in one expression; any failure re-runs the checks that name the problem
    if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(mask_words, torch.Tensor)):
        wshape, dev = weight.shape, weight.device
        if (len(wshape) == 2 and x.dtype == weight.dtype and x.dtype in FLOAT_DTYPES and x.dim() >= 1
                and x.shape[-1] == wshape[1] and mask_words.dtype == torch.int32
                and mask_words.shape == (wshape[0], words_per_row(wshape[1])) and x.device == dev
                and mask_words.device == dev
                and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (wshape[0],)
                                      and bias.dtype == x.dtype and bias.device == dev))):
            return
    check_float("x", x)
    check_float("weight", weight)
    require(weight.dim() == 2, lambda: f"masked_linear weight must be [N, K], got shape {tuple(weight.shape)}")
    require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    require(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
            lambda: f"x has shape {tuple(x.shape)}; its last dim must be K={weight.shape[1]}")
    check_words("mask_words", mask_words, weight.shape[0], weight.shape[1], 0)
    check_bias(bias, weight.shape[0], x.dtype)
    check_same_device(x=x, weight=weight, mask_words=mask_words, bias=bias)


def _check_linear_st(x, weight, mask_words, scores, bias) -> None:
    _check_linear(x, weight, mask_words, bias)
    check_scores(scores, weight)
    check_same_device(x=x, scores=scores)


def masked_linear(x, weight, mask_words, bias=None, scores=None, score_sign=False):
    """``y = x (W * M)^T + b`` for one task's packed mask.

    With ``scores`` (same shape as ``weight``), the mask's gradient flows straight through to
    them: ``dL/dscores = (dL/dy^T x) * W`` (training a supermask whose mask is ``[S >= 0]``).
    ``score_sign=True`` is for a mask chosen by ``|S|`` (the top-k binariser): the straight-through
    derivative is ``sign(S)``, and ``dL/dscores = (dL/dy^T x) * W * sign(S)`` (the
    ``masked_weight_grad_sign`` op; on the compiled CPU backend the sign is applied in the
    weight-gradient GEMM's epilogue, with no pass of its own).
    """
    if scores is None:  # a small layer's GG inference: one native call where it can be
        y = eager("masked_linear", x, weight, mask_words, bias)
        if y is not None:
            return y
    if _autocast.enabled(x.device.type):  # cast like F.linear under torch.autocast
        x, weight, bias, scores = _autocast.linear_args(x, weight, bias, scores)
    if scores is None:
        _check_linear(x, weight, mask_words, bias)
        args = (x, weight, mask_words, bias)
        if direct(args):  # call("masked_linear", ...), inlined: the GEMV-sized inference hot path
            return kernel("masked_linear", args)(*args)
        return call("masked_linear", *args)
    _check_linear_st(x, weight, mask_words, scores, bias)
    args = (x, weight, mask_words, scores, bias)
    if torch.is_grad_enabled() and plain_eager(args):
        return _MaskedLinearST.apply(*args, bool(score_sign), kernel("masked_linear", (x, weight, mask_words, bias)))
    return call("masked_linear_st", *args, bool(score_sign))
