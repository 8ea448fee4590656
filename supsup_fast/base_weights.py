"""Frozen base weights regenerated from a seed: the signed Kaiming constant.

Every weight is ``+-gain / sqrt(fan_in)`` with its sign taken from a counter-based hash of
``(seed, layer, index)`` (:func:`hash32`, :func:`layer_key`, :func:`signed_constant_signs` below
are that hash's specification), so a checkpoint stores the seed instead of the weights and every
backend regenerates them bit for bit.

The hash reads the low 32 bits of the seed and of the layer id (the spec functions below are defined
on any int that way, as the kernels are); the functions that name a base -- :func:`signed_constant`,
the ``seeded`` ops, :class:`~supsup_fast.config.SupsupConfig` and the masked layers -- take seeds and
layer ids in ``[0, 2**32)`` only (:func:`~supsup_fast.config.check_seed`), so one base has one name.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from . import ops
from .config import check_seed
from .errors import SupsupError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# The hash (format version 1): sign of weight i of layer l = bit 0 of hash32(i ^ layer_key(seed, l))
# --------------------------------------------------------------------------------------
def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32), on uint32 values held in int64 tensors."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    x = x ^ (x >> 16)
    return x


def layer_key(seed: int, layer: int) -> int:
    """The per-layer hash key ``hash32(layer ^ hash32(seed))`` as a Python int."""
    s = hash32(torch.tensor([seed & _U32], dtype=torch.int64))
    return int(hash32(torch.tensor([layer & _U32], dtype=torch.int64) ^ s).item())


def signed_constant_signs(seed: int, layer: int, numel: int, device=None) -> torch.Tensor:
    """Bool signs (True = +) of weights ``0..numel-1`` in row-major order: bit 0 of ``hash32(index ^ key)``."""
    key = layer_key(seed, layer)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return (hash32(idx ^ key) & 1).bool()


def layer_id_for(name: str) -> int:
    """A stable 31-bit layer id for a module's qualified name (``"features.0"``, ``"fc2"``...).

    CRC-32 of the UTF-8 name, so it is the same in every process and Python version (unlike
    ``hash()``), and non-negative so it fits any signed integer type.
    """
    if not isinstance(name, str):
        raise SupsupError(f"layer_id_for needs a module name (str), got {type(name).__name__}")
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def signed_constant(
    seed: int,
    layer: int,
    shape: Sequence[int],
    gain: float = math.sqrt(2.0),
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The signed-constant weight of one layer: ``+-gain / sqrt(fan_in)``, ``fan_in = prod(shape[1:])``.

    Filled by the ``signed_constant_fill_`` op: every backend writes the same bits as the
    reference's; the compiled ones without materialising the hash's intermediates.
    """
    seed, layer = check_seed(seed, "signed_constant: seed"), check_seed(layer, "signed_constant: layer")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise SupsupError(f"signed_constant needs a weight shape of at least 2 dims [out, in, ...], got {shape}")
    if any(s < 0 for s in shape):
        raise SupsupError(f"signed_constant: negative dimension in shape {shape}")
    if dtype not in _FLOAT_DTYPES:
        raise SupsupError(f"signed_constant: dtype must be fp16/bf16/fp32/fp64, got {dtype}")
    fan_in = math.prod(shape[1:])
    if fan_in == 0:
        raise SupsupError(f"signed_constant: fan_in is 0 for shape {shape}")
    out = torch.empty(shape, dtype=dtype, device=device)
    return ops.signed_constant_fill_(out, int(seed), int(layer), gain / math.sqrt(fan_in))
