"""Bandwidth-bound mask kernels: pack / unpack, ``W*M``, superposition, mask dot products and
signed-constant regeneration.

``masked_conv2d`` on the ``triton`` backend is one fused ``W*M`` pass (:func:`apply_mask`) followed
by cuDNN (``supsup_fast.backends._composite``). A fused implicit-GEMM convolution would save one
write and one read of the weight, small next to the activations (the weight is reused over every
output pixel), while cuDNN brings tuned algorithms for every stride/padding/dilation/group
combination. The ratio of the two passes has to be measured on a GPU (``bench/gpu/roofline.py``
times ``apply_mask`` against the convolution it feeds); none was measured yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import keep, key_i32, signed_tile, words_nk

# 2-D tiles over the [N, K] view; every kernel here is a stream, so one config serves.
_BN, _BK = 16, 256


def _grid2(n, k, bn=_BN, bk=_BK):
    return (triton.cdiv(n, bn), triton.cdiv(k, bk))


@triton.jit
def apply_mask_kernel(w_ptr, words_ptr, out_ptr, N, K, WPR, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = W*M`` (also serves ``unpack`` with ``W = 1`` via :func:`unpack_kernel`)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    tile = n_mask[:, None] & (offs_k[None, :] < K)
    n64 = offs_n.to(tl.int64)
    wrd = words_nk(words_ptr, n64 * WPR, n_mask, tl.program_id(1) * (BLOCK_K // 32), WPR, BLOCK_N, BLOCK_K)
    ptrs = n64[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + ptrs, mask=tile, other=0.0)
    tl.store(out_ptr + ptrs, keep(w, wrd, (tl.arange(0, BLOCK_K) & 31)[None, :]), mask=tile)


@triton.jit
def unpack_kernel(words_ptr, out_ptr, N, K, WPR, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words ``[N, WPR]`` -> 0/1 values ``[N, K]`` of the output's dtype (rows may span tasks)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    tile = n_mask[:, None] & (offs_k[None, :] < K)
    n64 = offs_n.to(tl.int64)
    wrd = words_nk(words_ptr, n64 * WPR, n_mask, tl.program_id(1) * (BLOCK_K // 32), WPR, BLOCK_N, BLOCK_K)
    bits = (wrd >> (tl.arange(0, BLOCK_K) & 31)[None, :]) & 1
    # via fp32: exact for 0/1, and the interpreter's int1 -> bf16 conversion is wrong
    vals = bits.to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + n64[:, None] * K + offs_k[None, :], vals, mask=tile)


@triton.jit
def pack_kernel(m_ptr, words_ptr, N, K, WPR, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Masks ``[N, K]`` (non-zero = kept) -> words ``[N, WPR]``; bits past ``K`` stay zero."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_k = tl.program_id(1) * (BLOCK_W * 32) + tl.arange(0, BLOCK_W * 32)
    n_mask = offs_n < N
    v = tl.load(m_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                mask=n_mask[:, None] & (offs_k[None, :] < K), other=0)
    bits = tl.reshape((v != 0).to(tl.int32), (BLOCK_N, BLOCK_W, 32))
    shifts = tl.arange(0, 32)
    # distinct powers of two: the sum is the bitwise OR (bit 31 wraps to the sign, as it should)
    wrd = tl.sum(bits << shifts[None, None, :], axis=2)
    tl.store(words_ptr + offs_n[:, None].to(tl.int64) * WPR + offs_w[None, :], wrd,
             mask=n_mask[:, None] & (offs_w[None, :] < WPR))


@triton.jit
def superpose_kernel(w_ptr, bank_ptr, alpha_ptr, out_ptr, N, K, WPR, T, SLAB,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = W * sum_t alpha_t M_t`` for one tile, fp32 accumulation, tasks with ``alpha_t = 0`` skipped."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    tile = n_mask[:, None] & (offs_k[None, :] < K)
    kw0 = tl.program_id(1) * (BLOCK_K // 32)
    n64 = offs_n.to(tl.int64)
    wd_off = n64 * WPR
    onehot = 1 << (tl.arange(0, BLOCK_K) & 31)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(0, T):
        a = tl.load(alpha_ptr + t).to(tl.float32)
        if a != 0.0:
            wrd = words_nk(bank_ptr + tl.cast(t, tl.int64) * SLAB, wd_off, n_mask, kw0, WPR, BLOCK_N, BLOCK_K)
            acc += tl.where((wrd & onehot) != 0, a, 0.0)
    ptrs = n64[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + ptrs, mask=tile, other=0.0)
    tl.store(out_ptr + ptrs, (w.to(tl.float32) * acc).to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def mask_dots_kernel(v_ptr, bank_ptr, out_ptr, N, K, WPR, T, SLAB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[r, t] += <v_r, M_t>`` over one tile of ``v_r`` (fp32 atomics into a zeroed ``[R, T]``).

    The tile of ``v`` is loaded once and reused for every task; each task costs only its bits.
    """
    r = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    tile = n_mask[:, None] & (offs_k[None, :] < K)
    kw0 = tl.program_id(1) * (BLOCK_K // 32)
    n64 = offs_n.to(tl.int64)
    wd_off = n64 * WPR
    onehot = 1 << (tl.arange(0, BLOCK_K) & 31)[None, :]
    v = tl.load(v_ptr + tl.cast(r, tl.int64) * N * K + n64[:, None] * K + offs_k[None, :],
                mask=tile, other=0.0).to(tl.float32)
    for t in range(0, T):
        wrd = words_nk(bank_ptr + tl.cast(t, tl.int64) * SLAB, wd_off, n_mask, kw0, WPR, BLOCK_N, BLOCK_K)
        s = tl.sum(tl.sum(tl.where((wrd & onehot) != 0, v, 0.0), axis=1), axis=0)
        tl.atomic_add(out_ptr + r * T + t, s)


@triton.jit
def signed_constant_kernel(out_ptr, N, K, key, scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fill ``[N, K]`` with ``+-scale`` from the hash of ``(key, n*K + k)``: the weights the seeded
    matmul regenerates in registers, written out (for checks and for layers that need them)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = signed_tile(offs_n, offs_k, K, key, scale, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=tile)


# ======================================================================================
# Launchers
# ======================================================================================
def _nk(weight):
    n = weight.shape[0]
    return n, (weight.numel() // n if n else 0)


def apply_mask(weight, mask_words):
    """``W * M`` for any weight shape ``[N, ...]``."""
    n, k = _nk(weight)
    w = weight.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        apply_mask_kernel[_grid2(n, k)](w, mask_words.contiguous(), out, n, k, mask_words.shape[-1],
                                        BLOCK_N=_BN, BLOCK_K=_BK)
    return out


_BYTE_VIEW = {torch.bool: torch.uint8}


def unpack_masks(words, k, dtype=torch.bool):
    """int32 words ``[..., N, W]`` -> ``[..., N, k]`` of ``dtype``."""
    lead = words.shape[:-1]
    rows = words.numel() // words.shape[-1] if words.shape[-1] else 0
    out = torch.empty(*lead, k, dtype=dtype, device=words.device)
    if out.numel():
        view = out.view(_BYTE_VIEW.get(dtype, dtype))
        unpack_kernel[_grid2(rows, k)](words.contiguous(), view, rows, k, words.shape[-1], BLOCK_N=_BN, BLOCK_K=_BK)
    return out


def pack_masks(masks):
    """Masks ``[..., N, K]`` -> int32 words ``[..., N, ceil(K/32)]``."""
    k = masks.shape[-1]
    wpr = (k + 31) // 32
    rows = masks.numel() // k if k else 0
    words = torch.zeros(*masks.shape[:-1], wpr, dtype=torch.int32, device=masks.device)
    if masks.numel():
        m = masks.contiguous()
        m = m.view(_BYTE_VIEW.get(m.dtype, m.dtype))
        pack_kernel[_grid2(rows, wpr, _BN, 8)](m, words, rows, k, wpr, BLOCK_N=_BN, BLOCK_W=8)
    return words


def superpose(weight, bank, alpha):
    """``W * sum_t alpha_t M_t`` over ``bank [T, N, W]``."""
    n, k = _nk(weight)
    w = weight.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        superpose_kernel[_grid2(n, k)](w, bank.contiguous(), alpha.contiguous(), out, n, k, bank.shape[-1],
                                       bank.shape[0], n * bank.shape[-1], BLOCK_N=_BN, BLOCK_K=_BK)
    return out


def mask_dots(v, bank):
    """``<v_r, M_t>``: ``v [R, N, K]`` or ``[N, K]`` -> ``[R, T]`` or ``[T]``."""
    squeeze = v.dim() == 2
    vv = (v.unsqueeze(0) if squeeze else v).contiguous()
    r, n, k = vv.shape
    t = bank.shape[0]
    out = torch.zeros(r, t, dtype=torch.float32, device=v.device)
    if vv.numel() and t:
        mask_dots_kernel[(*_grid2(n, k), r)](vv, bank.contiguous(), out, n, k, bank.shape[-1], t,
                                            n * bank.shape[-1], BLOCK_N=_BN, BLOCK_K=_BK)
    out = out.to(v.dtype)
    return out[0] if squeeze else out


def signed_constant_fill_(out, seed, layer, scale):
    """Fill the contiguous ``out`` with ``+-scale`` in place, bit-identical to the reference's
    (the constant is rounded to float32 first, then to ``out``'s dtype)."""
    from supsup_fast.base_weights import layer_key

    if out.numel():
        n = out.shape[0] if out.dim() else 1
        k = out.numel() // n
        signed_constant_kernel[_grid2(n, k)](out, n, k, key_i32(layer_key(seed, layer)), float(scale),
                                             BLOCK_N=_BN, BLOCK_K=_BK)
    return out


def signed_constant(seed, layer, n, k, scale, dtype=torch.float32, device="cuda"):
    """``[N, K]`` signed-constant weights ``+-scale``, bit-identical to the reference's."""
    return signed_constant_fill_(torch.empty(n, k, dtype=dtype, device=device), seed, layer, scale)


__all__ = [
    "apply_mask", "unpack_masks", "pack_masks", "superpose", "mask_dots", "signed_constant", "signed_constant_fill_",
]
