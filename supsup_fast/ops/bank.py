"""Ops over a whole bank of masks ``[T, N, ceil(K/32)]``: the superposition and its alpha gradient.

* ``superpose(W, bank, alpha)`` -- ``W * sum_t alpha_t M_t``, skipping ``alpha_t = 0``. On CPU an
  alpha shared by every task (one-shot inference's ``1/T``) is served from the bank's per-weight mask
  counts, counted once per bank (``backends/_shared_alpha.py``, bit-identical to the kernel);
* ``mask_dots(v, bank)`` -- ``<v_r, M_t>`` for every row and task. With ``v = dL/dW_eff * W`` this
  is ``dL/dalpha`` of a superposition: it is ``superpose``'s alpha gradient.
"""

from __future__ import annotations

import torch

from ..format import words_per_row
from ._checks import check_float, check_same_device, check_words, gemm_nk, require
from ._define import define, on_first
from ._fastpath import call, direct, fast, plain_eager
from ._registry import FLOAT_DTYPES, kernel


def _superpose_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _superpose_bwd(ctx, grad):
    weight, bank, alpha = ctx.saved_tensors
    gw = ga = None
    if ctx.needs_input_grad[0]:
        gw = fast.superpose(grad.contiguous(), bank, alpha)
    if ctx.needs_input_grad[2]:
        # half-precision weights: form v and its dots in float32, alpha's gradient sums many terms
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        v = (grad.to(acc) * weight.to(acc)).reshape(weight.shape[0], -1)
        ga = fast.mask_dots(v, bank).to(alpha.dtype)
    return gw, None, ga


def _check_superpose(weight, bank, alpha) -> None:
    # the common case in one expression; any failure re-runs the checks that name the problem
    if isinstance(weight, torch.Tensor) and isinstance(bank, torch.Tensor) and isinstance(alpha, torch.Tensor):
        shape, dev = bank.shape, weight.device
        n, k = gemm_nk(weight) if weight.dim() >= 1 else (-1, -1)
        if (weight.dtype in FLOAT_DTYPES and bank.dtype == torch.int32 and len(shape) == 3
                and shape[1] == n and shape[2] == words_per_row(k)
                and alpha.dim() == 1 and alpha.shape[0] == shape[0] and alpha.is_floating_point()
                and bank.device == dev and alpha.device == dev):
            return
    check_float("weight", weight)
    n, k = gemm_nk(weight)
    check_words("bank", bank, n, k, 1)
    require(isinstance(alpha, torch.Tensor), lambda: f"alpha must be a tensor, got {type(alpha).__name__}")
    require(alpha.dim() == 1 and alpha.shape[0] == bank.shape[0],
            lambda: f"alpha has shape {tuple(alpha.shape)}, expected [{bank.shape[0]}] (one weight per task)")
    require(alpha.is_floating_point(), lambda: f"alpha must be floating, got {alpha.dtype}")
    check_same_device(weight=weight, bank=bank, alpha=alpha)


define("superpose(Tensor weight, Tensor bank, Tensor alpha) -> Tensor", dispatch=on_first,
       fake=lambda weight, bank, alpha: torch.empty_like(weight, memory_format=torch.contiguous_format),
       backward=_superpose_bwd, setup_context=_superpose_setup, check=_check_superpose)


def _mask_dots_fake(v, bank):
    lead = () if v.dim() == 2 else (v.shape[0],)
    return v.new_empty((*lead, bank.shape[0]))


def _mask_dots_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mask_dots_bwd(ctx, grad):
    v, bank = ctx.saved_tensors
    # d<v, M_t>/dv = M_t, so dL/dv_r = sum_t g_rt M_t: a superposition with unit weight
    ones = torch.ones(v.shape[-2:], dtype=v.dtype, device=v.device)
    if v.dim() == 2:
        return fast.superpose(ones, bank, grad.to(v.dtype)), None
    return torch.stack([fast.superpose(ones, bank, g.to(v.dtype)) for g in grad.unbind(0)]), None


def _check_mask_dots(v, bank) -> None:
    check_float("v", v)
    require(v.dim() in (2, 3), lambda: f"mask_dots needs v of shape [N, K] or [R, N, K], got {tuple(v.shape)}")
    check_words("bank", bank, v.shape[-2], v.shape[-1], 1)
    check_same_device(v=v, bank=bank)


define("mask_dots(Tensor v, Tensor bank) -> Tensor", dispatch=on_first, fake=_mask_dots_fake,
       backward=_mask_dots_bwd, setup_context=_mask_dots_setup, check=_check_mask_dots)


class _SuperposeEager(torch.autograd.Function):
    """``superpose``'s autograd for plain eager tensors, without the dispatcher's autograd wrapper (the
    kernel is the registry's, the backward is the op's own): task inference's forward runs it once a
    layer, with alpha requiring grad. See :mod:`._fastpath`."""

    @staticmethod
    def forward(ctx, weight, bank, alpha, kernel_fn):
        _superpose_setup(ctx, (weight, bank, alpha), None)
        return kernel_fn(weight, bank, alpha)

    @staticmethod
    def backward(ctx, grad):
        return (*_superpose_bwd(ctx, grad), None)


def superpose(weight: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``W * sum_t alpha_t M_t`` over a bank ``[T, N, W]``, skipping ``alpha_t = 0``."""
    _check_superpose(weight, bank, alpha)
    args = (weight, bank, alpha)
    if direct(args):
        return kernel("superpose", args)(*args)
    if torch.is_grad_enabled() and plain_eager(args):
        return _SuperposeEager.apply(*args, kernel("superpose", args))
    return call("superpose", *args)


def mask_dots(v: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``<v_r, M_t>`` for all rows and tasks: ``v [R, N, K]`` or ``[N, K]`` -> ``[R, T]`` or ``[T]``."""
    _check_mask_dots(v, bank)
    return call("mask_dots", v, bank)
