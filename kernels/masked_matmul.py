"""Fused masked matmuls: ``y = x (W*M)^T + b`` and its gradients, with 1-bit packed masks.

The masked weight ``W*M`` never reaches memory: each program loads a ``[BLOCK_N, BLOCK_K]`` tile
of ``W`` and the ``BLOCK_N x BLOCK_K/32`` mask words covering it, masks it in registers
(:func:`._common.keep`, 2 SASS instructions per weight) and feeds the dot. The masked tile is the
*first* ``tl.dot`` operand (the kernels compute ``y^T = (W*M) x^T``).

Kernels
-------
``masked_linear_kernel``  one kernel for every M. Up to ``GEMV_MAX_M`` rows it is a split-K GEMV:
                        ``BLOCK_M`` = M rounded up to 16/32/64, K split until the grid covers the
                        GPU twice, ``W`` loaded ``evict_first`` (read once), and the fp32 partial
                        sums reduced inside the kernel by the split that finishes last (no extra
                        reduction, bias or cast kernels). Above it, a tiled GEMM in grouped order.
``masked_grad_input_kernel``  ``dX = dY (W*M)``: the same words read transposed; for few rows the
                        N range is split the same way so a ``K = 4096`` layer fills the GPU
``masked_weight_grad_kernel``  ``dS = (dY^T X) * W``: the straight-through score gradient, ``* W``
                        fused into the GEMM epilogue
``masked_linear_grouped_kernel``  rows of one batch use different tasks' masks: rows are sorted by
                        task; per K step the W tile is loaded once and each task present in the
                        tile applies its own mask to it
``masked_grouped_grad_input_kernel``  the grouped op's input gradient, the same way
SEEDED                  the weight is the signed constant ``+-scale`` regenerated in-kernel; no float
                        weight is read at all. Seed format 1: one hash per weight,
                        ``hash32(n*K + k ^ key)``; format 2: one hash per 32-weight word,
                        ``S(n, j) = H(R(n) ^ C(j))`` (``supsup_fast.seed_format`` specifies both)

Inputs are fp16, bf16 or fp32; accumulation is fp32. fp32 dots are IEEE unless torch allows tf32
for its own matmuls. Autotuning is keyed on M's power-of-two bucket, so a new batch size does
not tune again; ``SUPSUP_FAST_AUTOTUNE=0`` runs each kernel's first config only. Offsets that
scale with a tensor's size are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    ByDtype,
    allow_tf32,
    cfg,
    hash32,
    keep,
    key_i32,
    m_bucket,
    mma,
    signed_tile,
    signed_words_tile,
    split_reduce,
    upcast_dot,
    words_kn,
    words_nk,
)

GEMV_MAX_M = 64  # up to this many rows the forward (and dX) run the split GEMV
_GEMV_BLOCK_N = 64
_DX_BLOCK_K = 128
_K_QUANTUM = 256  # a split's K (or N) range is a multiple of every split config's block
_BIG = 2147483647


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


_SMEM_BUDGET = 216 * 1024  # of the 227 KiB a block may use on sm_90: ~5% margin on the estimate


@functools.lru_cache(maxsize=None)
def _smem_budget(device_index: int) -> int:
    """The estimate's budget on this device: 95% of its per-block opt-in shared memory (227 KiB on
    H100/H200, 163 KiB on A100, 99 KiB on consumer Ampere/Ada); sm_90's where there is no GPU."""
    if INTERPRET or device_index < 0 or not torch.cuda.is_available():
        return _SMEM_BUDGET
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    return int(optin * 0.95)


def smem_estimate(w_elems: int, other_elems: int, stages: int, nbytes: int, masked: bool = True) -> int:
    """Shared memory a pipelined tile loop needs, as the sm_90 compiles of these kernels measure
    it (``kernels/aot.py``): ``stages - 1`` buffers of the weight tile, the other operand's tile and
    the tile's words, plus the masked weight tile on its way to the tensor cores (and as much again
    for the layout conversions)."""
    words = w_elems // 8 if masked else 0
    return (stages - 1) * ((w_elems + other_elems) * nbytes + words) + (2 * w_elems * nbytes if masked else 0)


def config_fits(kind: str, meta: dict, stages: int, nbytes: int, budget: int = _SMEM_BUDGET) -> bool:
    """Whether a config's estimated shared memory fits ``budget`` (sm_90's by default; ``kind``:
    fwd / dx / ds). The default (first) config of every kernel fits sm_90 for every dtype."""
    if kind == "ds":
        est = smem_estimate(meta["BLOCK_N"] * meta["BLOCK_M"], meta["BLOCK_M"] * meta["BLOCK_K"], stages, nbytes,
                            masked=False)
    else:
        other = meta["BLOCK_K"] * meta["BLOCK_M"] if kind == "fwd" else meta["BLOCK_N"] * meta["BLOCK_M"]
        est = smem_estimate(meta["BLOCK_N"] * meta["BLOCK_K"], other, stages, nbytes)
    return est <= budget


def _prune(kind: str, operand: str):
    """``early_config_prune`` for the autotuner: drop configs whose tiles would not fit in shared
    memory for this dtype (a launch would fail; Triton would also skip them, after compiling)."""

    def prune(configs, named_args, **kwargs):
        t = named_args[operand]
        budget = _smem_budget(t.device.index or 0) if t.is_cuda else _SMEM_BUDGET
        nbytes = t.element_size()
        kept = [c for c in configs if config_fits(kind, {**kwargs, **c.kwargs}, c.num_stages, nbytes, budget)]
        return kept or configs[:1]

    return {"early_config_prune": prune}


def _gemv_block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


# ======================================================================================
# Split workspace: fp32 partials and re-armed tile counters, one per (device, stream)
# ======================================================================================
_WORKSPACES: dict = {}


def _workspace(device: torch.device, numel: int, tiles: int):
    """``(partials, counters)``: an fp32 buffer of at least ``numel`` and ``tiles`` int32 counters
    that are zero between launches (each launch's last split re-arms its tile's counter). Kept per
    stream, so launches on two streams never share counters; inside CUDA-graph capture they are
    fresh (the graph owns them and zeroes the counters when it is replayed)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return (torch.empty(numel, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < numel:
        ws = torch.empty(max(numel, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < tiles:
        cnt = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available() or device_index < 0:
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index or 0) if t.is_cuda else _num_sms(-1)


def _split(tiles: int, length: int, sms: int) -> tuple[int, int]:
    """``(splits, per_split)``: split ``length`` until about two programs per SM, each split a
    multiple of ``_K_QUANTUM``."""
    split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(length, _K_QUANTUM)))
    per = triton.cdiv(triton.cdiv(length, split), _K_QUANTUM) * _K_QUANTUM
    return triton.cdiv(length, per), per


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


# ======================================================================================
# Forward: split-K GEMV (M <= GEMV_MAX_M) and tiled GEMM, one kernel
# ======================================================================================
# GEMV: BLOCK_N and BLOCK_M come from the launcher (BLOCK_M from M), so they are not tuned here.
# fp32 lists: IEEE dots are FFMA loops holding both tiles in registers; larger tiles hit 255
# registers and a stack frame (kernels/aot.py).
_GEMV16 = [cfg(4, 3, BLOCK_K=128), cfg(4, 4, BLOCK_K=128), cfg(4, 3, BLOCK_K=256)]
_GEMV32 = [cfg(4, 3, BLOCK_K=64)]
_GEMV_INTERPRET = cfg(4, 1, BLOCK_K=128)
_GEMM16 = [
    cfg(4, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP=8),
    cfg(8, 3, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP=8),
    cfg(8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP=8),
]
_GEMM32 = [
    cfg(4, 3, BLOCK_N=64, BLOCK_M=64, BLOCK_K=32, GROUP=8),
    cfg(8, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, GROUP=8),
]
_GEMM_INTERPRET = cfg(4, 1, BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, GROUP=8)
_KEY = ["M_BUCKET", "N", "K", "K_SPLIT", "SEEDED", "UPCAST", "TF32"]


@triton.jit
def _store_rows(acc, y_ptr, bias_ptr, offs_n, n_mask, offs_m, m_mask, N, HAS_BIAS: tl.constexpr):
    """``y[m, n] = acc[n, m] + bias[n]`` in ``y``'s dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def masked_linear_kernel(
    x_ptr, w_ptr, words_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, WPR, key, key2, scale, K_SPLIT, M_BUCKET,
    HAS_BIAS: tl.constexpr, SEEDED: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
    SPLIT_K: tl.constexpr, EVICT_W: tl.constexpr, SEED_V2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Program ``(tile, split)`` reduces columns ``[split*K_SPLIT, (split+1)*K_SPLIT)`` of one
    ``[BLOCK_N, BLOCK_M]`` tile of ``y^T``; with ``SPLIT_K`` the splits meet in
    :func:`._common.split_reduce`. Seed format 2 takes the row and column keys as ``key``/``key2``."""
    pid_n, pid_m = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    n64 = offs_n.to(tl.int64)
    w_rows = w_ptr + n64[:, None] * K
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * K
    wd_off = n64 * WPR
    kb = (tl.arange(0, BLOCK_K) & 31)[None, :]
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if SEED_V2:
        row_hash = hash32(offs_n.to(tl.uint32) ^ tl.cast(key, tl.uint32, bitcast=True))  # R(n), once per row
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        wrd = words_nk(words_ptr, wd_off, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
        if SEEDED and SEED_V2:
            w = signed_words_tile(row_hash, k0 // 32, key2, kb, scale, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K)
        elif SEEDED:
            w = signed_tile(offs_n, offs_k, K, key, scale, x_ptr.dtype.element_ty)
        elif EVICT_W:  # streamed once: keep it from pushing x out of L2
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xt = tl.load(x_rows + offs_k[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        acc = mma(keep(w, wrd, kb), xt, acc, UPCAST, TF32)
    if SPLIT_K:
        tile = tl.program_id(0)
        ws_off = (tile.to(tl.int64) * (BLOCK_N * BLOCK_M) + tl.arange(0, BLOCK_N)[:, None] * BLOCK_M
                  + tl.arange(0, BLOCK_M)[None, :])
        last, acc = split_reduce(acc, tile, ws_ptr, cnt_ptr, ws_off, n_mask[:, None] & m_mask[None, :],
                                 tl.num_programs(0) * (BLOCK_N * BLOCK_M), tl.num_programs(1), pid_s)
        if last:
            _store_rows(acc, y_ptr, bias_ptr, offs_n, n_mask, offs_m, m_mask, N, HAS_BIAS)
    else:
        _store_rows(acc, y_ptr, bias_ptr, offs_n, n_mask, offs_m, m_mask, N, HAS_BIAS)


masked_gemv = ByDtype(masked_linear_kernel, _GEMV16, _GEMV32, _GEMV_INTERPRET, _KEY, _prune("fwd", "x_ptr"))
masked_gemm = ByDtype(masked_linear_kernel, _GEMM16, _GEMM32, _GEMM_INTERPRET, _KEY, _prune("fwd", "x_ptr"))


def _forward(x, weight, words, bias, key, scale, seeded, key2=0, v2=False):
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
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    w_arg = x2 if weight is None else weight
    b_arg = y if bias is None else bias
    flags = dict(HAS_BIAS=bias is not None, SEEDED=seeded, UPCAST=upcast_dot(x.dtype), TF32=allow_tf32(x.dtype),
                 SEED_V2=v2)
    if m <= GEMV_MAX_M:
        block_m = _gemv_block_m(m)
        tiles = triton.cdiv(n, _GEMV_BLOCK_N)
        split, k_split = _split(tiles, k, _sms(x2))
        ws, cnt = _workspace(x.device, split * tiles * _GEMV_BLOCK_N * block_m, tiles) if split > 1 else (y, y)
        masked_gemv[x.dtype][(tiles, split)](
            x2, w_arg, words, b_arg, y, ws, cnt, m, n, k, words.shape[1], key, key2, scale, k_split, block_m,
            **flags, SPLIT_K=split > 1, EVICT_W=True, BLOCK_N=_GEMV_BLOCK_N, BLOCK_M=block_m, GROUP=1,
        )
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]), 1)  # noqa: E731
        masked_gemm[x.dtype][grid](
            x2, w_arg, words, b_arg, y, y, y, m, n, k, words.shape[1], key, key2, scale, k, m_bucket(m),
            **flags, SPLIT_K=False, EVICT_W=False,
        )
    return y.reshape(*lead, n)


def masked_linear(x, weight, mask_words, bias=None):
    """``x [..., K] -> x (W*M)^T + b`` with ``W [N, K]``, ``mask_words [N, ceil(K/32)]``."""
    return _forward(x, weight, mask_words, bias, 0, 1.0, False)


def masked_linear_seeded(x, mask_words, seed, layer, scale, bias=None):
    """``masked_linear`` with ``W = +-scale`` regenerated in-kernel from ``(seed, layer)`` (seed format 1)."""
    from supsup_fast.base_weights import layer_key

    return _forward(x, None, mask_words, bias, key_i32(layer_key(seed, layer)), float(scale), True)


def seed_v2_keys(seed: int, layer: int) -> tuple[int, int]:
    """Seed format 2's row and column keys ``(kr, kc)`` (:func:`supsup_fast.seed_format.v2_keys`)."""
    from supsup_fast.seed_format import v2_keys

    return v2_keys(seed, layer)


def ternary_linear(x, mask_words, seed, layer, scale, bias=None):
    """``masked_linear`` with the signed constant of seed format 2: one hash per 32-weight word,
    so only the mask bits (and x) are read. The same function as the ternary op's reference."""
    kr, kc = seed_v2_keys(seed, layer)
    return _forward(x, None, mask_words, bias, key_i32(kr), float(scale), True, key2=key_i32(kc), v2=True)


# ======================================================================================
# Backward: dX = dY (W*M), split over N for few rows
# ======================================================================================
# split dX: BLOCK_K and BLOCK_M come from the launcher
_DX_SPLIT16 = [cfg(4, 3, BLOCK_N=64), cfg(4, 3, BLOCK_N=128), cfg(8, 3, BLOCK_N=128)]
_DX_SPLIT32 = [cfg(4, 3, BLOCK_N=32)]
_DX_SPLIT_INTERPRET = cfg(4, 1, BLOCK_N=64)
_DX16 = [
    cfg(4, 3, BLOCK_K=128, BLOCK_M=64, BLOCK_N=64, GROUP=8),
    cfg(8, 3, BLOCK_K=128, BLOCK_M=128, BLOCK_N=64, GROUP=8),
    cfg(8, 3, BLOCK_K=128, BLOCK_M=128, BLOCK_N=128, GROUP=8),
]
_DX32 = [
    cfg(4, 3, BLOCK_K=64, BLOCK_M=64, BLOCK_N=32, GROUP=8),
    cfg(8, 3, BLOCK_K=128, BLOCK_M=64, BLOCK_N=32, GROUP=8),
]
_DX_INTERPRET = cfg(4, 1, BLOCK_K=64, BLOCK_M=64, BLOCK_N=64, GROUP=8)
_DX_KEY = ["M_BUCKET", "N", "K", "N_SPLIT", "UPCAST", "TF32"]


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def masked_grad_input_kernel(
    g_ptr, w_ptr, words_ptr, dx_ptr, ws_ptr, cnt_ptr, M, N, K, WPR, N_SPLIT, M_BUCKET,
    UPCAST: tl.constexpr, TF32: tl.constexpr, SPLIT_N: tl.constexpr, EVICT_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """``dX^T [K, M] = (W*M)^T [K, N] dY^T [N, M]``; program ``(tile, split)`` sums rows
    ``[split*N_SPLIT, (split+1)*N_SPLIT)`` of W. The masked tile stays the first operand."""
    pid_k, pid_m = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask = offs_k < K
    m_mask = offs_m < M
    kb = (tl.arange(0, BLOCK_K) & 31)[:, None]
    n_lo = pid_s * N_SPLIT
    n_hi = tl.minimum(n_lo + N_SPLIT, N)
    g_rows = g_ptr + offs_m.to(tl.int64)[None, :] * N
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        n64 = offs_n.to(tl.int64)
        wrd = words_kn(words_ptr, n64 * WPR, n_mask, pid_k * (BLOCK_K // 32), WPR, BLOCK_K, BLOCK_N)
        w_ptrs = w_ptr + n64[None, :] * K + offs_k[:, None]
        if EVICT_W:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        gt = tl.load(g_rows + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        acc = mma(keep(w, wrd, kb), gt, acc, UPCAST, TF32)
    if SPLIT_N:
        tile = tl.program_id(0)
        ws_off = (tile.to(tl.int64) * (BLOCK_K * BLOCK_M) + tl.arange(0, BLOCK_K)[:, None] * BLOCK_M
                  + tl.arange(0, BLOCK_M)[None, :])
        last, acc = split_reduce(acc, tile, ws_ptr, cnt_ptr, ws_off, k_mask[:, None] & m_mask[None, :],
                                 tl.num_programs(0) * (BLOCK_K * BLOCK_M), tl.num_programs(1), pid_s)
        if last:
            tl.store(dx_ptr + offs_m.to(tl.int64)[None, :] * K + offs_k[:, None], acc.to(dx_ptr.dtype.element_ty),
                     mask=k_mask[:, None] & m_mask[None, :])
    else:
        tl.store(dx_ptr + offs_m.to(tl.int64)[None, :] * K + offs_k[:, None], acc.to(dx_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & m_mask[None, :])


masked_grad_input_split = ByDtype(masked_grad_input_kernel, _DX_SPLIT16, _DX_SPLIT32, _DX_SPLIT_INTERPRET, _DX_KEY,
                                  _prune("dx", "g_ptr"))
masked_grad_input_gemm = ByDtype(masked_grad_input_kernel, _DX16, _DX32, _DX_INTERPRET, _DX_KEY, _prune("dx", "g_ptr"))


def masked_linear_grad_input(grad_out, weight, mask_words):
    """``dL/dx [..., K] = dL/dy [..., N] (W*M)``."""
    n, k = weight.shape
    lead = grad_out.shape[:-1]
    g = grad_out.reshape(-1, n).contiguous()
    m = g.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(*lead, k, dtype=grad_out.dtype, device=grad_out.device)
    dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
    w, words = weight.contiguous(), mask_words.contiguous()
    flags = dict(UPCAST=upcast_dot(g.dtype), TF32=allow_tf32(g.dtype))
    if m <= GEMV_MAX_M:
        block_m = _gemv_block_m(m)
        tiles = triton.cdiv(k, _DX_BLOCK_K)
        split, n_split = _split(tiles, n, _sms(g))
        ws, cnt = _workspace(g.device, split * tiles * _DX_BLOCK_K * block_m, tiles) if split > 1 else (dx, dx)
        masked_grad_input_split[g.dtype][(tiles, split)](
            g, w, words, dx, ws, cnt, m, n, k, words.shape[1], n_split, block_m, **flags,
            SPLIT_N=split > 1, EVICT_W=True, BLOCK_K=_DX_BLOCK_K, BLOCK_M=block_m, GROUP=1,
        )
    else:
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(m, meta["BLOCK_M"]), 1)  # noqa: E731
        masked_grad_input_gemm[g.dtype][grid](g, w, words, dx, dx, dx, m, n, k, words.shape[1], n, m_bucket(m), **flags,
                                     SPLIT_N=False, EVICT_W=False)
    return dx.reshape(*lead, k)


# ======================================================================================
# Backward: straight-through score gradient dS = (dY^T X) * W
# ======================================================================================
_DS16 = [
    cfg(8, 3, BLOCK_N=128, BLOCK_K=128, BLOCK_M=64),
    cfg(4, 4, BLOCK_N=64, BLOCK_K=128, BLOCK_M=64),
    cfg(4, 4, BLOCK_N=128, BLOCK_K=64, BLOCK_M=64),
]
_DS32 = [cfg(4, 3, BLOCK_N=64, BLOCK_K=64, BLOCK_M=32), cfg(8, 3, BLOCK_N=128, BLOCK_K=64, BLOCK_M=32)]
_DS_INTERPRET = cfg(4, 1, BLOCK_N=64, BLOCK_K=64, BLOCK_M=64)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def masked_weight_grad_kernel(
    g_ptr, x_ptr, w_ptr, out_ptr, M, N, K, M_BUCKET, UPCAST: tl.constexpr, TF32: tl.constexpr,
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
        m64 = offs_m.to(tl.int64)
        gt = tl.load(g_ptr + m64[None, :] * N + offs_n[:, None], mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        xx = tl.load(x_ptr + m64[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(gt, xx, acc, UPCAST, TF32)
    tile = n_mask[:, None] & k_mask[None, :]
    nk = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + nk, mask=tile, other=0.0)
    tl.store(out_ptr + nk, (acc * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=tile)


masked_weight_grad_tuned = ByDtype(masked_weight_grad_kernel, _DS16, _DS32, _DS_INTERPRET,
                                   ["M_BUCKET", "N", "K", "UPCAST", "TF32"], _prune("ds", "g_ptr"))


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
    masked_weight_grad_tuned[g.dtype][grid](g, xx, weight.contiguous(), out, m, n, k, m_bucket(m),
                                    UPCAST=upcast_dot(g.dtype), TF32=allow_tf32(g.dtype))
    return out


# ======================================================================================
# Grouped: every row of x has its own task
# ======================================================================================
_GROUPED16 = [
    cfg(8, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP=8),
    cfg(8, 3, BLOCK_N=128, BLOCK_M=16, BLOCK_K=128, GROUP=8),
]
_GROUPED32 = [cfg(4, 3, BLOCK_N=64, BLOCK_M=32, BLOCK_K=32, GROUP=8)]
_GROUPED_INTERPRET = cfg(4, 1, BLOCK_N=64, BLOCK_M=32, BLOCK_K=64, GROUP=8)
_GROUPED_DX16 = [
    cfg(4, 3, BLOCK_K=128, BLOCK_M=64, BLOCK_N=64, GROUP=8),
    cfg(8, 3, BLOCK_K=128, BLOCK_M=16, BLOCK_N=128, GROUP=8),
]
_GROUPED_DX32 = [cfg(4, 3, BLOCK_K=64, BLOCK_M=32, BLOCK_N=32, GROUP=8)]
_GROUPED_DX_INTERPRET = cfg(4, 1, BLOCK_K=64, BLOCK_M=32, BLOCK_N=64, GROUP=8)
_GROUPED_KEY = ["M_BUCKET", "N", "K", "UPCAST", "TF32"]


@triton.jit
def _task_range(task_ptr, perm_ptr, offs_s, M, T):
    """Rows (in ``x``) of sorted positions ``offs_s``, their tasks, which are valid, first/last task."""
    s_mask = offs_s < M
    rows = tl.load(perm_ptr + offs_s, mask=s_mask, other=0)
    tasks = tl.load(task_ptr + offs_s, mask=s_mask, other=-1)
    valid = s_mask & (tasks >= 0) & (tasks < T)  # an out-of-range task contributes nothing
    t_lo = tl.min(tl.where(valid, tasks, 2147483647), axis=0)
    t_hi = tl.max(tl.where(valid, tasks, -1), axis=0)
    return rows, tasks, valid, s_mask, t_lo, t_hi


@triton.jit
def _next_task(tasks, valid, t):
    """The smallest task of the tile above ``t`` (sorted rows: the loop visits each task present once)."""
    return tl.min(tl.where(valid & (tasks > t), tasks, 2147483647), axis=0)


@triton.jit(do_not_specialize=["M", "M_BUCKET", "T", "SLAB"])
def masked_linear_grouped_kernel(
    x_ptr, w_ptr, bank_ptr, task_ptr, perm_ptr, bias_ptr, y_ptr, M, N, K, WPR, T, SLAB, M_BUCKET,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Rows arrive sorted by task (``perm`` maps sorted position -> row). A tile of one task runs a
    plain pipelined K loop. A tile of several: per K step the W and x tiles are loaded once and
    each task present masks W with its own words, multiplies the x tile and keeps the product in
    its own rows only, so W is read once whatever the number of tasks and no row sees another's."""
    pid_n, pid_m = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    rows, tasks, valid, s_mask, t_lo, t_hi = _task_range(task_ptr, perm_ptr, offs_s, M, T)
    n64 = offs_n.to(tl.int64)
    w_rows = w_ptr + n64[:, None] * K
    x_rows = x_ptr + rows.to(tl.int64)[None, :] * K
    wd_off = n64 * WPR
    kb = (tl.arange(0, BLOCK_K) & 31)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if t_lo == t_hi:  # one task in the tile (sorted rows: most tiles): a plain, pipelined K loop
        words_ptr = bank_ptr + t_lo.to(tl.int64) * SLAB
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            wrd = words_nk(words_ptr, wd_off, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_rows + offs_k[:, None], mask=k_mask[:, None] & valid[None, :], other=0.0)
            acc = mma(keep(w, wrd, kb), xt, acc, UPCAST, TF32)
    elif t_lo < t_hi:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            xt = tl.load(x_rows + offs_k[:, None], mask=k_mask[:, None] & valid[None, :], other=0.0)
            t = t_lo
            while t <= t_hi:
                wrd = words_nk(bank_ptr + t.to(tl.int64) * SLAB, wd_off, n_mask, k0 // 32, WPR, BLOCK_N, BLOCK_K)
                # the product over every row, kept in this task's rows only: a non-finite weight that
                # this task keeps, or a non-finite input of another row, never reaches another row
                part = mma(keep(w, wrd, kb), xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), UPCAST, TF32)
                acc = tl.where((tasks == t)[None, :], acc + part, acc)
                t = _next_task(tasks, valid, t)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows.to(tl.int64)[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & s_mask[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "T", "SLAB"])
def masked_grouped_grad_input_kernel(
    g_ptr, w_ptr, bank_ptr, task_ptr, perm_ptr, dx_ptr, M, N, K, WPR, T, SLAB, M_BUCKET,
    UPCAST: tl.constexpr, TF32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """``dX_i = dY_i (W*M_{t_i})`` as ``dX^T = (W*M_t)^T dY^T`` per task present in the tile,
    the W tile loaded once per N step."""
    pid_k, pid_m = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_mask = offs_k < K
    rows, tasks, valid, s_mask, t_lo, t_hi = _task_range(task_ptr, perm_ptr, offs_s, M, T)
    g_rows = g_ptr + rows.to(tl.int64)[None, :] * N
    kb = (tl.arange(0, BLOCK_K) & 31)[:, None]
    kw0 = pid_k * (BLOCK_K // 32)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    if t_lo == t_hi:  # one task in the tile: a plain, pipelined N loop
        words_ptr = bank_ptr + t_lo.to(tl.int64) * SLAB
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            n64 = offs_n.to(tl.int64)
            wrd = words_kn(words_ptr, n64 * WPR, n_mask, kw0, WPR, BLOCK_K, BLOCK_N)
            w = tl.load(w_ptr + n64[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            gt = tl.load(g_rows + offs_n[:, None], mask=n_mask[:, None] & valid[None, :], other=0.0)
            acc = mma(keep(w, wrd, kb), gt, acc, UPCAST, TF32)
    elif t_lo < t_hi:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            n64 = offs_n.to(tl.int64)
            w = tl.load(w_ptr + n64[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)
            gt = tl.load(g_rows + offs_n[:, None], mask=n_mask[:, None] & valid[None, :], other=0.0)
            t = t_lo
            while t <= t_hi:
                wrd = words_kn(bank_ptr + t.to(tl.int64) * SLAB, n64 * WPR, n_mask, kw0, WPR, BLOCK_K, BLOCK_N)
                part = mma(keep(w, wrd, kb), gt, tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32), UPCAST, TF32)
                acc = tl.where((tasks == t)[None, :], acc + part, acc)  # this task's rows only
                t = _next_task(tasks, valid, t)
    tl.store(dx_ptr + rows.to(tl.int64)[None, :] * K + offs_k[:, None], acc.to(dx_ptr.dtype.element_ty),
             mask=k_mask[:, None] & s_mask[None, :])


masked_linear_grouped_tuned = ByDtype(masked_linear_grouped_kernel, _GROUPED16, _GROUPED32, _GROUPED_INTERPRET,
                                      _GROUPED_KEY, _prune("fwd", "x_ptr"))
masked_grouped_grad_input_tuned = ByDtype(masked_grouped_grad_input_kernel, _GROUPED_DX16, _GROUPED_DX32,
                                          _GROUPED_DX_INTERPRET, _GROUPED_KEY, _prune("dx", "g_ptr"))


def _sorted_tasks(task_ids):
    """Task ids sorted (int32) and the permutation (int32): a sort on the device, no host sync."""
    tasks, perm = torch.sort(task_ids.to(torch.int32))
    return tasks.contiguous(), perm.to(torch.int32)


def masked_linear_grouped(x, weight, bank, task_ids, bias=None):
    """``y_i = x_i (W * M_{task_ids[i]})^T + b`` for ``x [M, K]``, ``bank [T, N, ceil(K/32)]``."""
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros(m, n, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias
        return y
    tasks, perm = _sorted_tasks(task_ids)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    masked_linear_grouped_tuned[x.dtype][grid](
        x.contiguous(), weight.contiguous(), bank.contiguous(), tasks, perm,
        y if bias is None else bias.contiguous(), y, m, n, k, bank.shape[-1], bank.shape[0], n * bank.shape[-1],
        m_bucket(m),
        HAS_BIAS=bias is not None, UPCAST=upcast_dot(x.dtype), TF32=allow_tf32(x.dtype),
    )
    return y


def masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
    """``dL/dx_i = dL/dy_i (W * M_{task_ids[i]})`` for ``grad_out [M, N]``."""
    m, n = grad_out.shape
    k = weight.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, k, dtype=grad_out.dtype, device=grad_out.device)
    tasks, perm = _sorted_tasks(task_ids)
    dx = torch.empty(m, k, dtype=grad_out.dtype, device=grad_out.device)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    masked_grouped_grad_input_tuned[grad_out.dtype][grid](
        grad_out.contiguous(), weight.contiguous(), bank.contiguous(), tasks, perm, dx, m, n, k, bank.shape[-1],
        bank.shape[0], n * bank.shape[-1], m_bucket(m), UPCAST=upcast_dot(grad_out.dtype),
        TF32=allow_tf32(grad_out.dtype),
    )
    return dx
