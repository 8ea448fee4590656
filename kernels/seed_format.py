"""Seed format 2 (:mod:`supsup_fast.seed_format`) in Triton: the sign word of 32 weights, one hash.

``v2_sign_word(row_hash, column_hash)`` is what a seeded Triton kernel calls per mask word it
loads (``row_hash = v2_row(kr, n)`` once per row, ``column_hash = v2_column(kc, j)`` once per word
column), all on ``uint32`` values: multiplications keep the low 32 bits and shifts are logical,
as the spec requires. ``v2_sign_words`` fills a whole ``[N, ceil(K/32)]`` table (tests compare it
with the spec under the interpreter and compile it for sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from supsup_fast import seed_format
from supsup_fast.format import words_per_row

from ._common import hash32


@triton.jit
def v2_row(kr, n):
    """``R(n) = H(kr ^ n)``."""
    return hash32(n.to(tl.uint32) ^ kr.to(tl.uint32))


@triton.jit
def v2_column(kc, j):
    """``C(j) = H(kc ^ j)``."""
    return hash32(j.to(tl.uint32) ^ kc.to(tl.uint32))


@triton.jit
def v2_sign_word(row_hash, column_hash):
    """``S(n, j) = H(R(n) ^ C(j))``: bit i is the sign (1 = +) of weight ``(n, 32 j + i)``."""
    return hash32(row_hash ^ column_hash)


@triton.jit
def v2_sign_words_kernel(out_ptr, N, WPR, kr, kc, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < N * WPR
    s = v2_sign_word(v2_row(kr, offs // WPR), v2_column(kc, offs % WPR))
    tl.store(out_ptr + offs, s.to(tl.int32, bitcast=True), mask=live)


def v2_sign_words(seed: int, layer: int, n: int, k: int, device) -> torch.Tensor:
    """The ``[N, ceil(K/32)]`` int32 sign words of seed format 2 (bits past ``K`` not cleared)."""
    wpr = words_per_row(k)
    kr, kc = seed_format.v2_keys(seed, layer)
    out = torch.empty(n * wpr, dtype=torch.int32, device=device)
    if out.numel():
        block = 128
        v2_sign_words_kernel[(triton.cdiv(out.numel(), block),)](out, n, wpr, kr, kc, BLOCK=block)
    return out.reshape(n, wpr)
