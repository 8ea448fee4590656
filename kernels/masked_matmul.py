"""Fused masked matmuls: ``y = x (W*M)^T + b`` and its gradients, with 1-bit packed masks.

The masked weight ``W*M`` never reaches memory: each program loads a ``[BLOCK_N, BLOCK_K]`` tile
of ``W`` and the ``BLOCK_N x BLOCK_K/32`` mask words covering it, unpacks the bits in registers
and zeroes the dropped weights before the dot. The masked tile is the *first* ``tl.dot`` operand
(the kernels compute ``y^T = (W*M) x^T``), so on Hopper it can feed the tensor cores from
registers while ``x`` streams through shared memory.

Kernels
-------
``masked_linear``       tiled GEMM (M large) / split-K (M <= ``SPLITK_MAX_M``), chosen by shape
``masked_linear_grad_input``  ``dX = dY (W*M)``: the same words read transposed
``masked_weight_grad``  ``dS = (dY^T X) * W``: the straight-through score gradient, ``* W`` fused
                        into the GEMM epilogue
``masked_linear_grouped``  rows of one batch use different tasks' masks, one launch: rows are
                        sorted by task; a tile runs one masked K-loop per task present in it
``masked_linear_seeded``  the weight is the signed constant ``+-scale`` regenerated in-kernel from
                        ``hash32(n*K + k ^ key)``; no float weight is read at all

Inputs are fp16, bf16 or fp32 (tf32 dots); accumulation is fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, bits_kn, bits_nk, cfg, configs, key_i32, mma, signed_tile, upcast_dot

SPLITK_MAX_M = 16  # at or below this many rows the forward uses the split-K kernel
_SPLITK_BLOCK_N = 64
_SPLITK_BLOCK_M = 16
_SPLITK_K_QUANTUM = 256  # a split's K range is a multiple of every split-K BLOCK_K


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


# ======================================================================================
# Forward: tiled GEMM
# ======================================================================================
_FWD_CONFIGS = configs(
    [
        cfg(4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP=8),
        cfg(8, 3, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP=8),
        cfg(8, 4, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP=8),
        cfg(4, 5, BLOCK_N=128, BLOCK_M=32, BLOCK_K=128, GROUP=8),
        cfg(4, 4, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128, GROUP=8),
    ],
    cfg(4, 1, BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, GROUP=8),
)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Grouped program order: ``GROUP`` weight row-tiles share x tiles while they sit in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP * num_m
    group = pid // per_group
    first_n = group * GROUP
    size = tl.minimum(num_n - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % size
    pid_m = (pid % per_group) // size
    return pid_n, pid_m


@triton.jit
def _masked_mm_body(
    x_ptr, w_ptr, words_ptr, offs_n, n_mask, offs_m, m_mask, acc, K, WPR, key, scale,
    SEEDED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``acc[n, m] += sum_k (W*M)[n, k] x[m, k]`` over the whole K range."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        bits = bits_nk(words_ptr, offs_n, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if SEEDED:
            w = signed_tile(offs_n, offs_k, K, key, scale, x_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        wm = tl.where(bits, w, tl.zeros_like(w))
        acc = mma(wm, xt, acc, UPCAST)
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "SEEDED", "UPCAST"])
@triton.jit
def masked_linear_kernel(
    x_ptr, w_ptr, words_ptr, bias_ptr, y_ptr, M, N, K, WPR, key, scale,
    HAS_BIAS: tl.constexpr, SEEDED: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_n, pid_m = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = _masked_mm_body(x_ptr, w_ptr, words_ptr, offs_n, n_mask, offs_m, m_mask, acc, K, WPR, key, scale,
                          SEEDED, UPCAST, BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


# ======================================================================================
# Forward: split-K for a handful of rows (decode-style inference)
# ======================================================================================
_SPLITK_CONFIGS = configs(
    [cfg(4, 4, BLOCK_K=128), cfg(4, 5, BLOCK_K=256), cfg(8, 4, BLOCK_K=256)],
    cfg(4, 1, BLOCK_K=128),
)


@triton.autotune(configs=_SPLITK_CONFIGS, key=["M", "N", "K", "K_SPLIT", "SEEDED", "UPCAST"])
@triton.jit
def masked_splitk_kernel(
    x_ptr, w_ptr, words_ptr, bias_ptr, out_ptr, M, N, K, WPR, key, scale, K_SPLIT,
    HAS_BIAS: tl.constexpr, SEEDED: tl.constexpr, PARTIAL: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Each program reduces ``K_SPLIT`` columns for ``BLOCK_N`` weight rows and all ``M <= BLOCK_M`` rows of x.

    With so few rows the op is a stream over ``W`` and its words: splitting K gives the grid enough
    programs to keep every SM loading. The x tile is padded to ``BLOCK_M = 16`` rows so the dot
    still maps to one small tensor-core instruction (its wasted work is free: the op is
    memory-bound). With ``PARTIAL`` the fp32 partial sums go to ``out[split, m, n]``.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        bits = bits_nk(words_ptr, offs_n, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
        if SEEDED:
            w = signed_tile(offs_n, offs_k, K, key, scale, x_ptr.dtype.element_ty)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        # k_mask matters only at a split's end, where the next split's bits live in the same word
        wm = tl.where(bits & k_mask[None, :], w, tl.zeros_like(w))
        xt = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = mma(wm, xt, acc, UPCAST)
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[None, :] * N + offs_n[:, None], acc,
                 mask=n_mask[:, None] & m_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splitk(x2, weight, words, bias, key, scale, seeded):
    m, k = x2.shape
    n = words.shape[0]
    n_tiles = triton.cdiv(n, _SPLITK_BLOCK_N)
    sms = _num_sms(x2.device.index or 0) if x2.is_cuda else _num_sms(-1)
    # split K until the grid covers the GPU about twice, but keep >= one quantum per split
    split = max(1, min(triton.cdiv(2 * sms, n_tiles), triton.cdiv(k, _SPLITK_K_QUANTUM)))
    k_split = triton.cdiv(triton.cdiv(k, split), _SPLITK_K_QUANTUM) * _SPLITK_K_QUANTUM
    split = triton.cdiv(k, k_split)
    upcast = upcast_dot(x2.dtype)
    w_arg = x2 if weight is None else weight
    if split == 1:
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        masked_splitk_kernel[(n_tiles, 1)](
            x2, w_arg, words, bias if bias is not None else y, y, m, n, k, words.shape[1], key, scale, k_split,
            HAS_BIAS=bias is not None, SEEDED=seeded, PARTIAL=False, UPCAST=upcast,
            BLOCK_M=_SPLITK_BLOCK_M, BLOCK_N=_SPLITK_BLOCK_N,
        )
        return y
    part = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    masked_splitk_kernel[(n_tiles, split)](
        x2, w_arg, words, part, part, m, n, k, words.shape[1], key, scale, k_split,
        HAS_BIAS=False, SEEDED=seeded, PARTIAL=True, UPCAST=upcast,
        BLOCK_M=_SPLITK_BLOCK_M, BLOCK_N=_SPLITK_BLOCK_N,
    )
    y = part.sum(0)
    if bias is not None:
        y += bias
    return y.to(x2.dtype)


def _forward(x, weight, words, bias, key, scale, seeded):
    k = x.shape[-1]
    n = words.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    words = words.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias
        return y.reshape(*lead, n)
    if m <= SPLITK_MAX_M:
        return _splitk(x2, weight, words, bias, key, scale, seeded).reshape(*lead, n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    masked_linear_kernel[grid](
        x2, x2 if weight is None else weight, words, y if bias is None else bias, y, m, n, k, words.shape[1],
        key, scale, HAS_BIAS=bias is not None, SEEDED=seeded, UPCAST=upcast_dot(x.dtype),
    )
    return y.reshape(*lead, n)


def masked_linear(x, weight, mask_words, bias=None):
    """``x [..., K] -> x (W*M)^T + b`` with ``W [N, K]``, ``mask_words [N, ceil(K/32)]``."""
    return _forward(x, weight, mask_words, bias, 0, 1.0, False)


def masked_linear_seeded(x, mask_words, seed, layer, scale, bias=None):
    """``masked_linear`` with ``W = +-scale`` regenerated in-kernel from ``(seed, layer)``."""
    from supsup_fast.base_weights import layer_key

    return _forward(x, None, mask_words, bias, key_i32(layer_key(seed, layer)), float(scale), True)


# ======================================================================================
# Backward: dX = dY (W*M)
# ======================================================================================
_DX_CONFIGS = configs(
    [
        cfg(4, 4, BLOCK_K=128, BLOCK_M=64, BLOCK_N=64, GROUP=8),
        cfg(8, 3, BLOCK_K=128, BLOCK_M=128, BLOCK_N=64, GROUP=8),
        cfg(8, 4, BLOCK_K=128, BLOCK_M=256, BLOCK_N=64, GROUP=8),
        cfg(4, 5, BLOCK_K=128, BLOCK_M=32, BLOCK_N=128, GROUP=8),
    ],
    cfg(4, 1, BLOCK_K=64, BLOCK_M=64, BLOCK_N=64, GROUP=8),
)


@triton.autotune(configs=_DX_CONFIGS, key=["M", "N", "K"])
@triton.jit
def masked_grad_input_kernel(
    g_ptr, w_ptr, words_ptr, dx_ptr, M, N, K, WPR, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """``dX^T [K, M] = (W*M)^T [K, N] dY^T [N, M]``; the masked tile stays the first operand."""
    pid_k, pid_m = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask = offs_k < K
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        bits = bits_kn(words_ptr, offs_n, n_mask, pid_k * (BLOCK_K // 32), WPR, BLOCK_K, BLOCK_N)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        gt = tl.load(g_ptr + offs_m[None, :] * N + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        acc = mma(tl.where(bits, w, tl.zeros_like(w)), gt, acc, UPCAST)
    tl.store(dx_ptr + offs_m[None, :] * K + offs_k[:, None], acc.to(dx_ptr.dtype.element_ty),
             mask=k_mask[:, None] & m_mask[None, :])


def masked_linear_grad_input(grad_out, weight, mask_words):
    """``dL/dx [..., K] = dL/dy [..., N] (W*M)``."""
    n, k = weight.shape
    lead = grad_out.shape[:-1]
    g = grad_out.reshape(-1, n).contiguous()
    m = g.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(*lead, k, dtype=grad_out.dtype, device=grad_out.device)
    dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    masked_grad_input_kernel[grid](g, weight.contiguous(), mask_words.contiguous(), dx, m, n, k, mask_words.shape[1],
                                   UPCAST=upcast_dot(g.dtype))
    return dx.reshape(*lead, k)


# ======================================================================================
# Backward: straight-through score gradient dS = (dY^T X) * W
# ======================================================================================
_DS_CONFIGS = configs(
    [
        cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_M=64),
        cfg(4, 4, BLOCK_N=64, BLOCK_K=128, BLOCK_M=64),
        cfg(4, 4, BLOCK_N=128, BLOCK_K=64, BLOCK_M=64),
    ],
    cfg(4, 1, BLOCK_N=64, BLOCK_K=64, BLOCK_M=64),
)


@triton.autotune(configs=_DS_CONFIGS, key=["M", "N", "K"])
@triton.jit
def masked_weight_grad_kernel(
    g_ptr, x_ptr, w_ptr, out_ptr, M, N, K, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``dS [N, K] = (dY^T [N, M] X [M, K]) * W``, the product with ``W`` done in the epilogue."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        gt = tl.load(g_ptr + offs_m[None, :] * N + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        xx = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(gt, xx, acc, UPCAST)
    tile = n_mask[:, None] & k_mask[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=tile, other=0.0)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], (acc * w.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=tile)


def masked_weight_grad(grad_out, x, weight):
    """``dL/dS = (dL/dy^T x) * W`` summed over all leading dims of ``grad_out`` / ``x``."""
    n, k = weight.shape
    g = grad_out.reshape(-1, n).contiguous()
    xx = x.reshape(-1, k).to(g.dtype).contiguous()
    m = g.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    out = torch.empty(n, k, dtype=weight.dtype, device=weight.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    masked_weight_grad_kernel[grid](g, xx, weight.contiguous(), out, m, n, k, UPCAST=upcast_dot(g.dtype))
    return out


# ======================================================================================
# Grouped: every row of x has its own task
# ======================================================================================
_GROUPED_CONFIGS = configs(
    [
        cfg(4, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64),
        cfg(4, 4, BLOCK_N=64, BLOCK_M=32, BLOCK_K=128),
        cfg(4, 4, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128),
    ],
    cfg(4, 1, BLOCK_N=64, BLOCK_M=32, BLOCK_K=64),
)


@triton.autotune(configs=_GROUPED_CONFIGS, key=["M", "N", "K"])
@triton.jit
def masked_linear_grouped_kernel(
    x_ptr, w_ptr, bank_ptr, task_ptr, perm_ptr, bias_ptr, y_ptr, M, N, K, WPR,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows arrive sorted by task (``perm`` maps sorted position -> row); one masked K-loop per
    task present in the tile, with the other rows' x zeroed, so every tile is a plain GEMM."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_n = pid // num_m
    pid_m = pid % num_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    s_mask = offs_s < M
    rows = tl.load(perm_ptr + offs_s, mask=s_mask, other=0)
    tasks = tl.load(task_ptr + offs_s, mask=s_mask, other=-1)
    t_lo = tl.min(tl.where(s_mask, tasks, 2147483647), axis=0)
    t_hi = tl.max(tasks, axis=0)
    slab = N * WPR
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(t_lo, t_hi + 1):
        sel = s_mask & (tasks == t)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:  # sorted rows: most tiles hold one or two tasks
            words_ptr = bank_ptr + tl.cast(t, tl.int64) * slab
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                bits = bits_nk(words_ptr, offs_n, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
                w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0)
                xt = tl.load(x_ptr + rows[None, :].to(tl.int64) * K + offs_k[:, None],
                             mask=k_mask[:, None] & sel[None, :], other=0.0)
                acc = mma(tl.where(bits, w, tl.zeros_like(w)), xt, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[None, :].to(tl.int64) * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & s_mask[None, :])


def masked_linear_grouped(x, weight, bank, task_ids, bias=None):
    """``y_i = x_i (W * M_{task_ids[i]})^T + b`` for ``x [M, K]``, ``bank [T, N, ceil(K/32)]``."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias
        return y
    tasks, perm = torch.sort(task_ids.to(torch.int32))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    masked_linear_grouped_kernel[grid](
        x.contiguous(), weight.contiguous(), bank.contiguous(), tasks.contiguous(), perm.to(torch.int32),
        y if bias is None else bias.contiguous(), y, m, n, k, bank.shape[-1], HAS_BIAS=bias is not None,
        UPCAST=upcast_dot(x.dtype),
    )
    return y
