"""Pieces shared by the Triton kernels: mask-bit unpacking, the signed-constant hash, configs.

Bits are unpacked in registers from the packed ``int32`` words of :mod:`supsup_fast.format`
(weight ``(n, k)`` is bit ``k % 32`` of word ``[n, k // 32]``), so a float mask never exists in
memory. Every tile's K extent is a multiple of 32, so a tile reads whole words.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 kernels run on CPU tensors with numpy; @triton.autotune with more
# than one config cannot benchmark there, so every kernel gets exactly one config.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

U32 = 0xFFFFFFFF


def configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """The autotuning list on a GPU, or the single config the interpreter can run."""
    return [interpret] if INTERPRET else gpu


def cfg(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def key_i32(key: int) -> int:
    """A uint32 hash key reinterpreted as int32, so it reaches a kernel as an ``i32`` scalar."""
    key &= U32
    return key - (1 << 32) if key >= (1 << 31) else key


@triton.jit
def bits_nk(words_ptr, offs_n, n_mask, kw0, WPR, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mask bits of rows ``offs_n`` and columns ``32*kw0 .. 32*kw0 + BLOCK_K`` as a ``[BLOCK_N, BLOCK_K]`` int1 tile."""
    offs_w = kw0 + tl.arange(0, BLOCK_K // 32)
    wrd = tl.load(
        words_ptr + offs_n[:, None] * WPR + offs_w[None, :],
        mask=n_mask[:, None] & (offs_w[None, :] < WPR),
        other=0,
    )
    shifts = tl.arange(0, 32)
    bits = (wrd[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_N, BLOCK_K)) != 0


@triton.jit
def bits_kn(words_ptr, offs_n, n_mask, kw0, WPR, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same bits, transposed: a ``[BLOCK_K, BLOCK_N]`` int1 tile (for ``dX = dY (W*M)``)."""
    offs_w = kw0 + tl.arange(0, BLOCK_K // 32)
    wrd = tl.load(
        words_ptr + offs_n[None, :] * WPR + offs_w[:, None],
        mask=n_mask[None, :] & (offs_w[:, None] < WPR),
        other=0,
    )
    shifts = tl.arange(0, 32)
    bits = (wrd[:, None, :] >> shifts[None, :, None]) & 1
    return tl.reshape(bits, (BLOCK_K, BLOCK_N)) != 0


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
    return tl.where(pos, s, -s).to(dtype)


def upcast_dot(dtype) -> bool:
    """Whether dots must run in fp32: the interpreter's bf16 ``tl.dot`` returns wrong values."""
    import torch

    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulation); ``UPCAST`` only under the interpreter for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
