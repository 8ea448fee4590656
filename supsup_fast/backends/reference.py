"""Pure-PyTorch reference path: the executable specification of every op.

Written to read like the paper (Wortsman et al., 2020), not to be fast. Every fast backend
is tested against these functions, and they serve as the last-resort backend (``reference``,
every device). One function per dispatched op, under the op's name (:func:`impls`).

Notation: a layer's frozen weight ``W`` is viewed as ``[N, K]``; task ``t``'s supermask
``M_t`` is stored as packed bits (see :mod:`supsup_fast.format`); ``alpha`` weighs tasks in
a superposition ``W * sum_t alpha_t M_t``.

Non-finite values: a mask *selects*. Where ``M = 0`` the masked tensor's entry is an exact zero
whatever it holds (``W * M`` is ``where(M, W, 0)``: a pruned weight does not exist, so a NaN or
Inf there does not reach the output); ``sum_t alpha_t M_t`` adds ``alpha_t`` only where ``M_t``
keeps the weight, and ``<v, M_t>`` sums ``v`` only where ``M_t`` keeps it. Everything else is
IEEE arithmetic: the input of a layer is used densely (``x (W * M)^T`` multiplies the exact zeros
too, so a NaN or Inf anywhere in a row of ``x`` makes that row's outputs NaN), as are ``W`` in
``superpose`` and the gradients. For finite weights this is exactly ``F.linear(x, W * M)``; every
backend follows it, and ``tests/ops/test_nonfinite.py`` checks that they do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import seed_format
from ..base_weights import hash32, layer_key, signed_constant_signs  # noqa: F401  (the hash spec)
from ..format import WORD_BITS, words_per_row
from ..objectives import entropy, g_objective  # noqa: F401  (kept importable from here)
from ._composite import grouped_grad_input_by_task

_BIT_POSITIONS = torch.arange(WORD_BITS, dtype=torch.int64)
_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Packed masks
# --------------------------------------------------------------------------------------
def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Masks ``[..., N, K]`` (non-zero = kept) -> int32 words ``[..., N, ceil(K/32)]``."""
    k = masks.shape[-1]
    w = words_per_row(k)
    bits = (masks != 0).to(torch.int64)
    bits = F.pad(bits, (0, w * WORD_BITS - k))
    bits = bits.reshape(*masks.shape[:-1], w, WORD_BITS)
    words = (bits << _BIT_POSITIONS.to(masks.device)).sum(-1)  # uint32 value held in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32)


def unpack_masks(words: torch.Tensor, k: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """int32 words ``[..., N, W]`` -> masks ``[..., N, k]`` of ``dtype`` (0/1 or bool)."""
    u = words.to(torch.int64) & _U32
    bits = (u.unsqueeze(-1) >> _BIT_POSITIONS.to(words.device)) & 1
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)[..., :k]
    return bits.to(dtype)


def _mask_of(weight: torch.Tensor, mask_words: torch.Tensor) -> torch.Tensor:
    """The bool mask of ``weight``'s shape, from one task's words ``[N, W]``."""
    n = weight.shape[0]
    k = weight.numel() // n if n else 0
    return unpack_masks(mask_words, k, torch.bool).reshape(weight.shape)


# --------------------------------------------------------------------------------------
# One task's mask applied to the frozen weight
# --------------------------------------------------------------------------------------
def apply_mask(weight: torch.Tensor, mask_words: torch.Tensor) -> torch.Tensor:
    """``W * M``: the subnetwork selected by one supermask (kept weights, exact zeros elsewhere)."""
    return torch.where(_mask_of(weight, mask_words), weight, weight.new_zeros(()))


def masked_linear(x, weight, mask_words, bias=None):
    """``y = x (W * M)^T + b``."""
    return F.linear(x, apply_mask(weight, mask_words), bias)


def masked_linear_grad_input(grad_out, weight, mask_words):
    """``dL/dx = dL/dy (W * M)``."""
    return grad_out @ apply_mask(weight, mask_words)


def masked_weight_grad(grad_out, x, weight):
    """Straight-through score gradient ``dL/dS = (dL/dy^T x) * W`` over all leading dims."""
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = grad_out.reshape(-1, grad_out.shape[-1]).to(acc_dtype)
    xx = x.reshape(-1, x.shape[-1]).to(acc_dtype)
    return ((g.t() @ xx) * weight.to(acc_dtype)).to(weight.dtype)


def masked_weight_grad_sign(grad_out, x, weight, scores):
    """The top-k binariser's score gradient ``(dL/dy^T x) * W * sign(S)``: its mask is a function of
    ``|S|``, so the straight-through derivative ``dM/dS`` is ``sign(S)``."""
    return masked_weight_grad(grad_out, x, weight) * scores.sign().to(weight.dtype)


def masked_conv2d(x, weight, mask_words, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """``conv2d(x, W * M) + b`` with the mask over the ``[O, I/g * kh * kw]`` view of ``W``."""
    return F.conv2d(x, apply_mask(weight, mask_words), bias, stride, padding, dilation, groups)


def masked_linear_grouped(x, weight, bank, task_ids, bias=None):
    """Row ``i`` of ``x [M, K]`` uses task ``task_ids[i]``'s mask: ``y_i = x_i (W * M_{t_i})^T + b``."""
    y = x.new_zeros(x.shape[0], weight.shape[0])
    for t in torch.unique(task_ids).tolist():
        rows = task_ids == t
        y[rows] = masked_linear(x[rows], weight, bank[t], bias)
    return y


#: ``dL/dx_i = dL/dy_i (W * M_{t_i})``, the input gradient of :func:`masked_linear_grouped`: rows
#: bucketed by task, each bucket through :func:`masked_linear_grad_input`
masked_linear_grouped_grad_input = grouped_grad_input_by_task(masked_linear_grad_input)


# --------------------------------------------------------------------------------------
# Superposition of many tasks' masks
# --------------------------------------------------------------------------------------
def superpose(weight: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``W * sum_t alpha_t M_t`` over a bank ``[T, N, W]``; tasks with ``alpha_t = 0`` are skipped.

    Accumulates in float32 (float64 for float64 weights).
    """
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n = weight.shape[0]
    k = weight.numel() // n if n else 0
    mixed = torch.zeros(n, k, dtype=acc_dtype, device=weight.device)
    zero = mixed.new_zeros(())
    for t in torch.nonzero(alpha).flatten().tolist():
        mixed += torch.where(unpack_masks(bank[t], k, torch.bool), alpha[t].to(acc_dtype), zero)
    return (weight.to(acc_dtype) * mixed.reshape(weight.shape)).to(weight.dtype)


def mask_dots(v: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``<v_r, M_t>`` for every row ``r`` and task ``t``: ``v [R, N, K]`` (or ``[N, K]``) -> ``[R, T]`` (or ``[T]``).

    With ``v = dL/dW_eff * W`` this is ``dL/dalpha`` of a superposition.
    """
    squeeze = v.dim() == 2
    vv = v.unsqueeze(0) if squeeze else v
    acc_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    k = vv.shape[-1]
    v_acc, zero = vv.to(acc_dtype), vv.new_zeros((), dtype=acc_dtype)
    out = torch.stack(
        [torch.where(unpack_masks(bank[t], k, torch.bool), v_acc, zero).sum((-2, -1)) for t in range(bank.shape[0])],
        dim=-1,
    ) if bank.shape[0] else vv.new_zeros(vv.shape[0], 0, dtype=acc_dtype)
    out = out.to(v.dtype)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------
# Frozen base weights: the signed Kaiming constant (its hash is specified in base_weights)
# --------------------------------------------------------------------------------------
def signed_constant_fill_(out: torch.Tensor, seed: int, layer: int, scale: float) -> None:
    """``out[i] = +scale`` or ``-scale`` (row-major ``i``), the sign from the hash of ``(seed, layer, i)``.

    The constant is formed in float32, then cast to ``out``'s dtype.
    """
    c = torch.tensor(scale, dtype=torch.float32, device=out.device)
    signs = signed_constant_signs(seed, layer, out.numel(), out.device)
    out.copy_(torch.where(signs, c, -c).to(out.dtype).reshape(out.shape))


def signed_constant(seed: int, layer: int, shape, gain: float = math.sqrt(2.0), dtype=torch.float32, device=None,
                    format_version: int = seed_format.DEFAULT_SEED_FORMAT):
    """Signed Kaiming constant: every weight is ``+-gain / sqrt(fan_in)``, ``fan_in = prod(shape[1:])``.

    Depends only on ``(seed, layer, index)`` and the seed format, so every backend and device
    regenerates it bit-identically.
    """
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=dtype, device=device)
    seeded_fill_(out, seed, layer, gain / math.sqrt(math.prod(shape[1:])), format_version)
    return out


def masked_linear_seeded(x, mask_words, seed, layer, scale, bias=None):
    """``masked_linear`` whose weight is the signed constant ``+-scale`` regenerated from ``(seed, layer)``."""
    weight = torch.empty(mask_words.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    signed_constant_fill_(weight, seed, layer, scale)
    return masked_linear(x, weight, mask_words, bias)


# --------------------------------------------------------------------------------------
# The seed formats (supsup_fast.seed_format): the fill, and the ternary layer
# --------------------------------------------------------------------------------------
def seeded_fill_(out: torch.Tensor, seed: int, layer: int, scale: float, format_version: int) -> None:
    """``out = +-scale`` over ``out``'s ``[N, K]`` view, the signs in seed format ``format_version``.

    Version 1 is :func:`signed_constant_fill_`. The constant is formed in float32, then cast.
    """
    n = out.shape[0]
    k = out.numel() // n if n else 0
    signs = seed_format.signs(seed, layer, (n, k), format_version, out.device)
    c = torch.tensor(scale, dtype=torch.float32, device=out.device)
    out.copy_(torch.where(signs, c, -c).to(out.dtype).reshape(out.shape))


def _ternary_weight(mask_words, n, k, seed, layer, scale, dtype, device, format_version):
    """``W * M``: the signed constant ``+-scale`` of seed format ``format_version`` under the mask."""
    weight = torch.empty(n, k, dtype=dtype, device=device)
    seeded_fill_(weight, seed, layer, scale, format_version)
    return apply_mask(weight, mask_words)


def ternary_linear(x, mask_words, seed, layer, scale, bias=None, format_version=2):
    """``x (W * M)^T + b`` with ``W = +-scale`` regenerated in seed format ``format_version``: ternary
    weights ``{-scale, 0, +scale}``, nothing stored but the mask."""
    w = _ternary_weight(mask_words, mask_words.shape[0], x.shape[-1], seed, layer, scale, x.dtype, x.device,
                        format_version)
    return F.linear(x, w, bias)


def ternary_linear_grad_input(grad_out, mask_words, k, seed, layer, scale, format_version=2):
    """``dL/dx = dL/dy (W * M)``."""
    w = _ternary_weight(mask_words, mask_words.shape[0], k, seed, layer, scale, grad_out.dtype, grad_out.device,
                        format_version)
    return grad_out @ w


# --------------------------------------------------------------------------------------
# The binarisers' selections
# --------------------------------------------------------------------------------------
def _order_key(a: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """int64 keys ordered as the IEEE total order of ``a`` (of ``|a|`` with ``magnitude``): the float's
    bits, with the non-sign bits of negative numbers flipped."""
    width = 8 * a.element_size()
    bits = a.contiguous().view({16: torch.int16, 32: torch.int32, 64: torch.int64}[width]).to(torch.int64)
    low = (1 << (width - 1)) - 1  # every bit but the sign
    if magnitude:
        return bits & low
    return bits ^ ((bits >> 63) & low)


def largest_k(a: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the flat ``a`` (of ``|a|`` with ``magnitude``).

    Order: IEEE total order (NaN above +inf; ``-0 < +0`` unless ``magnitude``). Ties at the k-th
    value are taken in index order.
    """
    out = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    order = torch.sort(_order_key(a.reshape(-1), magnitude), descending=True, stable=True).indices
    out[order[:k]] = True
    return out


def topk_words(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Edge-popup: 1 on the ``k`` largest ``|S|`` of ``scores [N, K]``, packed."""
    return pack_masks(largest_k(scores.reshape(-1), k, True).reshape(scores.shape))


def threshold_words(scores: torch.Tensor) -> torch.Tensor:
    """``M = [S >= 0]`` of ``scores [N, K]``, packed."""
    return pack_masks(scores >= 0)


def impls(op_names) -> dict:
    """``op -> reference implementation`` for every op in ``op_names`` (each must have one)."""
    here = globals()
    missing = [op for op in op_names if not callable(here.get(op))]
    if missing:
        raise NotImplementedError(f"the reference backend has no implementation of {missing}")
    return {op: here[op] for op in op_names}
