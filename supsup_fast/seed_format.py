"""The seed formats: how a signed-constant base weight is regenerated from ``(seed, layer)``.

This module is the one definition of both versions (the C++ header ``csrc/seed_format.h`` and
every kernel follow it; tests compare them bit for bit). A weight ``[N, *rest]`` is viewed as
``[N, K]``, ``K = prod(rest)``, exactly as a packed mask is (:func:`supsup_fast.format.gemm_shape`).
Every weight is ``+c`` or ``-c`` with ``c = gain / sqrt(K)``; only the sign comes from the hash.

All arithmetic is on unsigned 32-bit integers (multiplication keeps the low 32 bits), so CUDA,
Triton and SIMD CPU code regenerate the same bits with plain 32-bit integer instructions::

    H(x)  = lowbias32:  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16
    s, l  = seed mod 2**32, layer mod 2**32
    key   = H(l ^ H(s))                                  the layer key (both versions)

Version 1 (every bank and checkpoint written before version 2 existed; what a file that records
no version holds): one hash per weight. With ``i`` the weight's row-major flat index::

    weight (n, k) is +c  iff  H((n*K + k) mod 2**32  ^  key) & 1

Version 2 (made for kernels; the default of new layers): one hash per 32-weight word, aligned
with the packed mask words, so a kernel regenerates the signs of 32 weights with one hash and
never reads them::

    kr      = H(key ^ 0x243F6A88)        row key      (0x243F6A88, 0x85A308D3: digits of pi)
    kc      = H(key ^ 0x85A308D3)        column key
    R(n)    = H(kr ^ n)                  one per row,          0 <= n < N <= 2**32
    C(j)    = H(kc ^ j)                  one per column word,  0 <= j < ceil(K/32) <= 2**32
    S(n, j) = H(R(n) ^ C(j))             the sign word of weights (n, 32j) .. (n, 32j + 31)
    weight (n, k) is +c  iff  bit (k mod 32) of S(n, k // 32) is set   (bit 0 = least significant)

Bits of the last word past ``K`` are unused. ``C(j)`` enters through its own hash (not ``j``
itself) so that two rows whose keys happen to differ in a few low bits do not share shifted
copies of each other's words, and it is keyed by the layer so that two layers' rows never
coincide wholesale. A kernel computes ``R`` once per row and ``C`` once per word column (or
keeps a table of them), then one ``H`` per word: about 10 integer instructions per 32 weights.

The value ``c`` is rounded to float32 first, then cast to the requested dtype (both versions).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .format import WORD_BITS, gemm_shape, words_per_row

SEED_FORMAT_VERSIONS = (1, 2)
# what a new layer uses: its signs cost one hash per 32 weights, so the ternary kernel never reads W
DEFAULT_SEED_FORMAT = 2
# what a bank, checkpoint or run that records no version holds (all of them were written before v2)
UNRECORDED_SEED_FORMAT = 1

ROW_SALT = 0x243F6A88
COLUMN_SALT = 0x85A308D3

_U32 = 0xFFFFFFFF
_BIT_POSITIONS = torch.arange(WORD_BITS, dtype=torch.int64)


def check_version(version) -> int:
    """``version`` as an int, or a ValueError naming the supported versions."""
    if isinstance(version, bool) or not isinstance(version, int) or version not in SEED_FORMAT_VERSIONS:
        raise ValueError(f"seed format version must be one of {SEED_FORMAT_VERSIONS}, got {version!r}")
    return int(version)


# --------------------------------------------------------------------------------------
# The hash (uint32 values held in int64 tensors)
# --------------------------------------------------------------------------------------
def hash32(x: torch.Tensor) -> torch.Tensor:
    """``H``: the lowbias32 finaliser on uint32 values held in an int64 tensor."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    x = x ^ (x >> 16)
    return x


def _h(value: int) -> int:
    return int(hash32(torch.tensor([value & _U32], dtype=torch.int64)).item())


def layer_key(seed: int, layer: int) -> int:
    """``key = H(layer ^ H(seed))`` on the low 32 bits of each (both versions)."""
    return _h((int(layer) & _U32) ^ _h(int(seed)))


def v2_keys(seed: int, layer: int) -> tuple[int, int]:
    """Version 2's ``(kr, kc)``: the row and column keys of one layer."""
    key = layer_key(seed, layer)
    return _h(key ^ ROW_SALT), _h(key ^ COLUMN_SALT)


# --------------------------------------------------------------------------------------
# Signs
# --------------------------------------------------------------------------------------
def _to_int32(u: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def _check_nk(n: int, k: int) -> tuple[int, int]:
    n, k = int(n), int(k)
    if n < 0 or k < 0:
        raise ValueError(f"seed format: negative weight shape [N={n}, K={k}]")
    if n > 2**32 or words_per_row(k) > 2**32:
        raise ValueError(f"seed format: [N={n}, K={k}] exceeds the 2**32 rows / words the hash counts")
    return n, k


def v2_sign_words(seed: int, layer: int, n: int, k: int, device=None) -> torch.Tensor:
    """Version 2's sign words ``S(n, j)`` of an ``[N, K]`` weight, as int32 ``[N, ceil(K/32)]``."""
    n, k = _check_nk(n, k)
    kr, kc = v2_keys(seed, layer)
    rows = hash32(torch.arange(n, dtype=torch.int64, device=device) ^ kr)  # R(n)
    cols = hash32(torch.arange(words_per_row(k), dtype=torch.int64, device=device) ^ kc)  # C(j)
    return _to_int32(hash32(rows[:, None] ^ cols[None, :]))


def v1_signs(seed: int, layer: int, numel: int, device=None) -> torch.Tensor:
    """Version 1's signs (True = +) of flat indices ``0 .. numel-1``: bit 0 of ``H(i ^ key)``."""
    idx = torch.arange(int(numel), dtype=torch.int64, device=device)
    return (hash32(idx ^ layer_key(seed, layer)) & 1).bool()


def signs(seed: int, layer: int, shape: Sequence[int], version: int = DEFAULT_SEED_FORMAT, device=None) -> torch.Tensor:
    """Bool signs (True = +) of a weight of ``shape`` in seed format ``version``."""
    version = check_version(version)
    shape = tuple(int(s) for s in shape)
    n, k = gemm_shape(shape)
    if version == 1:
        return v1_signs(seed, layer, n * k, device).reshape(shape)
    words = v2_sign_words(seed, layer, n, k, device).to(torch.int64) & _U32
    bits = (words.unsqueeze(-1) >> _BIT_POSITIONS.to(words.device)) & 1
    return bits.reshape(n, -1)[:, :k].bool().reshape(shape)


def sign_words(seed: int, layer: int, n: int, k: int, version: int = DEFAULT_SEED_FORMAT, device=None) -> torch.Tensor:
    """The signs of an ``[N, K]`` weight packed like a mask (int32 ``[N, ceil(K/32)]``, zero padding).

    Version 2's words are ``S(n, j)`` with the bits past ``K`` cleared; version 1's are its
    per-weight signs packed. A ternary kernel's positive weights are ``mask & signs``.
    """
    version = check_version(version)
    n, k = _check_nk(n, k)
    if version == 2:
        words = v2_sign_words(seed, layer, n, k, device)
        if k % WORD_BITS and n:
            words[:, -1] &= (1 << (k % WORD_BITS)) - 1
        return words
    bits = v1_signs(seed, layer, n * k, device).reshape(n, k).to(torch.int64)
    w = words_per_row(k)
    bits = torch.nn.functional.pad(bits, (0, w * WORD_BITS - k)).reshape(n, w, WORD_BITS)
    return _to_int32((bits << _BIT_POSITIONS.to(bits.device)).sum(-1))


def signed_constant(
    seed: int,
    layer: int,
    shape: Sequence[int],
    gain: float = math.sqrt(2.0),
    dtype: torch.dtype = torch.float32,
    device=None,
    version: int = DEFAULT_SEED_FORMAT,
) -> torch.Tensor:
    """The signed-constant weight ``+-gain / sqrt(K)`` of ``shape`` in seed format ``version``.

    Version 1 is bit-identical to :func:`supsup_fast.reference.signed_constant`.
    """
    shape = tuple(int(s) for s in shape)
    _, k = gemm_shape(shape)
    c = torch.tensor(gain / math.sqrt(k), dtype=torch.float32, device=device)
    return torch.where(signs(seed, layer, shape, version, device), c, -c).to(dtype)


def signed_constant_from_scale(
    seed: int, layer: int, n: int, k: int, scale: float, dtype: torch.dtype = torch.float32, device=None,
    version: int = DEFAULT_SEED_FORMAT,
) -> torch.Tensor:
    """``[N, K]`` weight ``+-scale`` (``scale`` given directly, as the seeded kernels take it)."""
    c = torch.tensor(float(scale), dtype=torch.float32, device=device)
    return torch.where(signs(seed, layer, (n, k), version, device), c, -c).to(dtype)
