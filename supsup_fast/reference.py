"""Pure-PyTorch reference path: the executable specification of every op.

Written to read like the paper (Wortsman et al., 2020), not to be fast. Every fast backend
is tested against these functions, and they serve as the last-resort backend.

Notation: a layer's frozen weight ``W`` is viewed as ``[N, K]``; task ``t``'s supermask
``M_t`` is stored as packed bits (see :mod:`supsup_fast.format`); ``alpha`` weighs tasks in
a superposition ``W * sum_t alpha_t M_t``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base_weights import hash32, layer_key, signed_constant_signs  # noqa: F401  (the hash spec)
from .format import WORD_BITS, words_per_row
from .objectives import entropy, g_objective  # noqa: F401  (kept importable from here)

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
    """The 0/1 mask of ``weight``'s shape and dtype, from one task's words ``[N, W]``."""
    n = weight.shape[0]
    k = weight.numel() // n if n else 0
    return unpack_masks(mask_words, k, weight.dtype).reshape(weight.shape)


# --------------------------------------------------------------------------------------
# One task's mask applied to the frozen weight
# --------------------------------------------------------------------------------------
def apply_mask(weight: torch.Tensor, mask_words: torch.Tensor) -> torch.Tensor:
    """``W * M``: the subnetwork selected by one supermask."""
    return weight * _mask_of(weight, mask_words)


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


def masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
    """``dL/dx_i = dL/dy_i (W * M_{t_i})``: the input gradient of :func:`masked_linear_grouped`."""
    gx = grad_out.new_zeros(grad_out.shape[0], weight.shape[1])
    for t in torch.unique(task_ids).tolist():
        rows = task_ids == t
        gx[rows] = masked_linear_grad_input(grad_out[rows], weight, bank[t])
    return gx


def masked_linear_seeded(x, mask_words, seed, layer, scale, bias=None):
    """``masked_linear`` whose weight is the signed constant ``+-scale`` regenerated from ``(seed, layer)``."""
    n, k = mask_words.shape[0], x.shape[-1]
    signs = signed_constant_signs(seed, layer, n * k, x.device).reshape(n, k)
    weight = torch.where(signs, scale, -scale).to(x.dtype)
    return masked_linear(x, weight, mask_words, bias)


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
    for t in torch.nonzero(alpha).flatten().tolist():
        mixed += alpha[t].to(acc_dtype) * unpack_masks(bank[t], k, acc_dtype)
    return (weight.to(acc_dtype) * mixed.reshape(weight.shape)).to(weight.dtype)


def mask_dots(v: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``<v_r, M_t>`` for every row ``r`` and task ``t``: ``v [R, N, K]`` (or ``[N, K]``) -> ``[R, T]`` (or ``[T]``).

    With ``v = dL/dW_eff * W`` this is ``dL/dalpha`` of a superposition.
    """
    squeeze = v.dim() == 2
    vv = v.unsqueeze(0) if squeeze else v
    acc_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    k = vv.shape[-1]
    out = torch.stack(
        [(vv.to(acc_dtype) * unpack_masks(bank[t], k, acc_dtype)).sum((-2, -1)) for t in range(bank.shape[0])],
        dim=-1,
    ) if bank.shape[0] else vv.new_zeros(vv.shape[0], 0, dtype=acc_dtype)
    out = out.to(v.dtype)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------
# Frozen base weights: the signed Kaiming constant (its hash is specified in base_weights)
# --------------------------------------------------------------------------------------
def signed_constant(seed: int, layer: int, shape, gain: float = math.sqrt(2.0), dtype=torch.float32, device=None):
    """Signed Kaiming constant: every weight is ``+-gain / sqrt(fan_in)``, sign from the hash.

    Depends only on ``(seed, layer, index)``, so every backend and device regenerates it
    bit-identically; ``fan_in = prod(shape[1:])``.
    """
    shape = tuple(int(s) for s in shape)
    fan_in = math.prod(shape[1:])
    c = gain / math.sqrt(fan_in)
    signs = signed_constant_signs(seed, layer, math.prod(shape), device)
    return torch.where(signs, c, -c).to(dtype).reshape(shape)
