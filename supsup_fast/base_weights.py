"""Frozen base weights regenerated from a seed: the signed Kaiming constant.

Every weight is ``+-gain / sqrt(fan_in)`` with its sign taken from a counter-based hash of
``(seed, layer, index)``, so a checkpoint stores the seed instead of the weights and every backend
regenerates them bit for bit. How the hash is laid out is the seed format, specified once in
:mod:`supsup_fast.seed_format` (:func:`hash32`, :func:`layer_key` and :func:`signed_constant_signs`
are re-exported here): version 2, one hash per 32-weight word, is the default of new layers, the
one the ternary kernels (:mod:`supsup_fast.ops.ternary`) regenerate cheaply; version 1, one hash per
weight, is what a bank or checkpoint that records no version holds.

The hash reads the low 32 bits of the seed and of the layer id (the spec functions are defined
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
from .seed_format import DEFAULT_SEED_FORMAT, check_version, hash32, layer_key  # noqa: F401  (the hash spec)
from .seed_format import v1_signs as signed_constant_signs  # noqa: F401

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
    format_version: int = DEFAULT_SEED_FORMAT,
) -> torch.Tensor:
    """The signed-constant weight of one layer: ``+-gain / sqrt(fan_in)``, ``fan_in = prod(shape[1:])``.

    ``format_version`` is the seed format (1, or 2, the default; :mod:`supsup_fast.seed_format`).
    Filled by the ``signed_constant_fill_`` (version 1) or ``seeded_fill_`` op: every backend writes
    the same bits as the reference's; the compiled ones without materialising the hash's intermediates.
    """
    try:
        version = check_version(format_version)
    except ValueError as e:
        raise SupsupError(f"signed_constant: {e}") from None
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
    if version == 1:
        return ops.signed_constant_fill_(out, int(seed), int(layer), gain / math.sqrt(fan_in))
    return ops.seeded_fill_(out, int(seed), int(layer), gain / math.sqrt(fan_in), version)
