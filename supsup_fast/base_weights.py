"""Frozen base weights regenerated from a seed: the signed Kaiming constant.

Every weight is ``+-gain / sqrt(fan_in)`` with its sign taken from a counter-based hash of
``(seed, layer, index)``, so a checkpoint stores the seed instead of the weights and every backend
regenerates them bit for bit. How the hash is laid out is the seed format
(:mod:`supsup_fast.seed_format`): version 1, one hash per weight, is what every bank and checkpoint
so far records (and :func:`supsup_fast.reference.signed_constant` computes); version 2, one hash per
32-weight word, is the one the ternary kernels (:mod:`supsup_fast.ternary`) regenerate cheaply.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from . import reference as ref
from . import seed_format as _seed_format
from ._native import EXT_LOADED
from .errors import SupsupError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    format_version: int = _seed_format.DEFAULT_SEED_FORMAT,
) -> torch.Tensor:
    """The signed-constant weight of one layer: ``+-gain / sqrt(fan_in)``, ``fan_in = prod(shape[1:])``.

    ``format_version`` is the seed format (1, the default, or 2; see :mod:`supsup_fast.seed_format`).
    Equal bit for bit to :func:`supsup_fast.seed_format.signed_constant` (and, for version 1, to
    :func:`supsup_fast.reference.signed_constant`); on CPU the compiled extension fills it without
    materialising the hash's intermediates.
    """
    try:
        version = _seed_format.check_version(format_version)
    except ValueError as e:
        raise SupsupError(f"signed_constant: {e}") from None
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
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if EXT_LOADED and dev.type == "cpu":
        out = torch.empty(shape, dtype=dtype, device=dev)
        if version == 1:
            torch.ops.supsup_fast_C.signed_constant_fill_(out, int(seed), int(layer), gain / math.sqrt(fan_in))
        else:
            torch.ops.supsup_fast_C.seeded_fill_(out, int(seed), int(layer), gain / math.sqrt(fan_in), version)
        return out
    if version == 1:
        return ref.signed_constant(seed, layer, shape, gain=gain, dtype=dtype, device=dev)
    return _seed_format.signed_constant(seed, layer, shape, gain=gain, dtype=dtype, device=dev, version=version)
