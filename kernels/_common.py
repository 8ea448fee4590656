"""Pieces shared by the Triton kernels: mask-bit unpacking, the signed-constant hash, configs.

Bits are unpacked in registers from the packed ``int32`` words of :mod:`supsup_fast.format`
(weight ``(n, k)`` is bit ``k % 32`` of word ``[n, k // 32]``), so a float mask never exists in
memory. Every tile's K extent is a multiple of 32, so a tile reads whole words.

Unpacking is elementwise in the weight tile's own layout: each element gets its word by a
broadcast of the ``[rows, words]`` tile (no layout conversion) and tests its own bit. On a GPU a
pair of 16-bit weights is masked with 4 instructions (two rotates put the pair's bits on the
sign bits of bytes 1 and 3, one ``prmt`` replicates them into a 32-bit mask, one ``and``), i.e. 2
SASS instructions per weight; 32-bit weights use a bit test and a select (2 per weight). The
interpreter runs the same function as a plain ``tl.where``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 kernels run on CPU tensors with numpy; @triton.autotune with more
# than one config cannot benchmark there, so every kernel gets exactly one config.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# SUPSUP_FAST_AUTOTUNE=0: every kernel runs its first (default) config, no autotuning. For tests
# (one compile per specialisation) and for code that is first called inside CUDA-graph capture.
AUTOTUNE = os.environ.get("SUPSUP_FAST_AUTOTUNE", "1") not in ("", "0")
# inline PTX only where it is compiled (the interpreter cannot run it)
USE_ASM = tl.constexpr(not INTERPRET)

U32 = 0xFFFFFFFF


def configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The autotuning list on a GPU (only its first entry without autotuning), or the single
    config the interpreter can run. The first GPU config is the default: it must fit every dtype."""
    if INTERPRET:
        return [interpret]
    return list(gpu) if AUTOTUNE else [gpu[0]]


def cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


class ByDtype:
    """One kernel autotuned over two config lists: 16-bit inputs (tensor-core tiles) and fp32
    (IEEE FFMA tiles, which need far fewer elements per thread to stay off the stack). Each list's
    first config is that dtype class's default (``SUPSUP_FAST_AUTOTUNE=0`` runs only it)."""

    def __init__(self, fn, gpu16, gpu32, interpret, key, prune=None):
        self.fn = fn
        self._tuners = {
            cls: triton.autotune(configs=configs(gpu, interpret), key=key, prune_configs_by=prune)(fn)
            for cls, gpu in (("16", gpu16), ("32", gpu32))
        }

    def __getitem__(self, dtype):
        """The autotuner for inputs of ``dtype`` (a torch dtype)."""
        import torch

        return self._tuners["32" if dtype == torch.float32 else "16"]


def m_bucket(m: int) -> int:
    """Autotuning key for a row count: the next power of two (16 at least, 8192 at most), so a new
    batch size re-uses the tuned config of its bucket instead of tuning again."""
    b = 16
    while b < m and b < 8192:
        b *= 2
    return b


def key_i32(key: int) -> int:
    """A uint32 hash key reinterpreted as int32, so it reaches a kernel as an ``i32`` scalar."""
    key &= U32
    return key - (1 << 32) if key >= (1 << 31) else key


@triton.jit
def words_nk(words_ptr, row_off, n_mask, kw0, WPR, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each element of a ``[BLOCK_N, BLOCK_K]`` tile's word: rows at word offsets ``row_off``
    (int64), columns ``32*kw0 .. 32*kw0 + BLOCK_K``. Words past ``WPR`` or masked rows read 0."""
    offs_w = kw0 + tl.arange(0, BLOCK_K // 32)
    wrd = tl.load(words_ptr + row_off[:, None] + offs_w[None, :],
                  mask=n_mask[:, None] & (offs_w[None, :] < WPR), other=0)
    return tl.reshape(tl.broadcast_to(wrd[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))


@triton.jit
def words_kn(words_ptr, row_off, n_mask, kw0, WPR, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same words for a transposed ``[BLOCK_K, BLOCK_N]`` tile (``dX = dY (W*M)``)."""
    offs_w = kw0 + tl.arange(0, BLOCK_K // 32)
    wrd = tl.load(words_ptr + row_off[None, :] + offs_w[:, None],
                  mask=n_mask[None, :] & (offs_w[:, None] < WPR), other=0)
    return tl.reshape(tl.broadcast_to(wrd[:, None, :], (BLOCK_K // 32, 32, BLOCK_N)), (BLOCK_K, BLOCK_N))


@triton.jit
def keep(w, wrd, kb):
    """``w`` where bit ``kb`` (0..31, broadcast to ``w``'s shape) of ``wrd`` is set, else +0."""
    if USE_ASM and w.dtype.primitive_bitwidth == 16:
        z = tl.zeros(w.shape, tl.int32)
        lo = ((15 - kb) & 31) + z  # rotate bit kb of an element in a pair's low half to bit 15
        hi = ((31 - kb) & 31) + z  # ... of the high half to bit 31
        wi = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t1, t2, m;
            shf.l.wrap.b32 t1, $2, $2, $4;
            shf.l.wrap.b32 t2, $3, $3, $7;
            prmt.b32 m, t1, t2, 0xFF99;
            and.b32 $0, $1, m;
            }""",
            constraints="=r,r,r,r,r,r,r,r",
            args=[w.to(tl.int16, bitcast=True), wrd + z, lo, hi],
            dtype=tl.int16, is_pure=True, pack=2,
        )
        return wi.to(w.dtype, bitcast=True)
    else:
        return tl.where((wrd & (1 << kb)) != 0, w, tl.zeros_like(w))


@triton.jit
def hash32(x):
    """lowbias32 on uint32 (wrapping multiplies), the same finaliser as ``supsup_fast.base_weights.hash32``."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def constant_as(s, dtype: tl.constexpr):
    """The fp32 scalar ``s`` rounded to ``dtype`` to nearest even, as the reference's ``.to(dtype)``
    does: once per program, not per weight. For bfloat16 the rounding is done on the bits, because
    Triton's interpreter truncates fp32 -> bf16 conversions (the GPU rounds; both now agree); the
    callers negate in fp32 too (the interpreter's bf16 negation is wrong)."""
    if dtype == tl.bfloat16:
        u = s.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return s.to(dtype)


@triton.jit
def signed_tile(offs_n, offs_k, K, key, scale, dtype: tl.constexpr):
    """Signed-constant weights ``+-scale`` of rows ``offs_n``, columns ``offs_k`` (an ``[n, k]`` tile).

    ``index = n*K + k`` modulo 2**32, ``sign = hash32(index ^ key) & 1``; ``key`` is the layer key
    as int32 bits. Rounds ``scale`` (fp32) to ``dtype`` exactly as the reference does.
    """
    kk = tl.cast(K, tl.uint32)
    idx = offs_n[:, None].to(tl.uint32) * kk + offs_k[None, :].to(tl.uint32)
    h = hash32(idx ^ tl.cast(key, tl.uint32, bitcast=True))
    pos = (h & 1) != 0
    s = tl.cast(scale, tl.float32)
    return tl.where(pos, constant_as(s, dtype), constant_as(-s, dtype))


@triton.jit
def signed_words_tile(row_hash, kw0, col_key, kb, scale, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """Seed format 2's ``+-scale`` for a ``[BLOCK_N, BLOCK_K]`` tile at word column ``kw0``: one
    hash per 32 weights, ``S(n, j) = H(R(n) ^ C(j))`` with ``C(j) = H(kc ^ j)``; weight ``(n, k)``
    is ``+scale`` iff bit ``k % 32`` of ``S(n, k // 32)`` is set. ``row_hash`` holds ``R(n)``."""
    cols = hash32((kw0 + tl.arange(0, BLOCK_K // 32)).to(tl.uint32) ^ tl.cast(col_key, tl.uint32, bitcast=True))
    sw = hash32(row_hash[:, None] ^ cols[None, :]).to(tl.int32, bitcast=True)
    sgn = tl.reshape(tl.broadcast_to(sw[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))
    s = tl.cast(scale, tl.float32)
    return tl.where((sgn & (1 << kb)) != 0, constant_as(s, dtype), constant_as(-s, dtype))


def upcast_dot(dtype) -> bool:
    """Whether dots must run in fp32: the interpreter's bf16 ``tl.dot`` returns wrong values."""
    import torch

    return INTERPRET and dtype == torch.bfloat16


def allow_tf32(dtype) -> bool:
    """fp32 dots use tf32 only where torch's own fp32 matmuls would (``allow_tf32`` /
    ``set_float32_matmul_precision``); otherwise they are IEEE fp32, like ``F.linear``."""
    import torch

    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, TF32: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulation). fp32 operands: tf32 with ``TF32``, else IEEE.
    ``UPCAST`` only under the interpreter for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        if TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def split_reduce(acc, tile, ws_ptr, cnt_ptr, ws_off, ws_mask, slab, nsplit, pid_s):
    """In-kernel split reduction. Every split stores its fp32 partial ``acc`` at ``ws_off`` (int64,
    the tile's place) of its own ``slab``-sized part of the workspace; the split that arrives last
    at the tile's counter sums all partials in split order (deterministic: the same bits whichever
    split is last) and returns ``(True, sum)``; the others return ``(False, acc)``. The last one
    re-arms the counter at 0 for the next launch.
    """
    slab64 = slab.to(tl.int64)
    tl.store(ws_ptr + pid_s.to(tl.int64) * slab64 + ws_off, acc, mask=ws_mask)
    tl.debug_barrier()  # the whole partial is written before the counter moves
    done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = done == nsplit - 1
    total = acc
    if last:
        total = tl.zeros_like(acc)
        for s in range(0, nsplit):
            total += tl.load(ws_ptr + s * slab64 + ws_off, mask=ws_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total
