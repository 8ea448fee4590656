"""The packed supermask format: the single definition of how masks become bits.

A layer's weight of shape ``[N, *rest]`` is viewed as a GEMM operand ``[N, K]`` with
``K = prod(rest)`` (a conv kernel ``[O, I/g, kh, kw]`` gives ``K = I/g * kh * kw``, in
``weight.reshape(N, -1)`` order). One task's mask is stored as ``int32`` words of shape
``[N, W]`` with ``W = ceil(K / 32)``:

* weight ``(n, k)`` is bit ``k % 32`` of word ``[n, k // 32]``, least-significant bit first;
* every row starts at a fresh word (row-aligned), so a GEMM tile covering rows
  ``n0:n1`` and columns ``k0:k1`` (``k0`` a multiple of 32) finds its bits by index
  arithmetic alone;
* padding bits past ``K`` in a row's last word are always zero;
* a bank of ``T`` tasks is ``[T, N, W]`` (task-major, each task contiguous).

That is exactly one bit per weight per task, plus at most 31 bits of padding per row.
A bit is set where the mask is non-zero (``bool`` masks, or float masks of 0/1).

``FORMAT_VERSION`` is written into every saved bank; a change to anything above must bump it.
This module holds the layout only and imports nothing of the package; packing itself is the
``pack_masks`` / ``unpack_masks`` ops (:mod:`supsup_fast.ops.bits`, also as ``format.pack`` /
``format.unpack`` for masks of a weight's own shape).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FORMAT_VERSION = 1
WORD_BITS = 32
WORD_DTYPE = torch.int32


def gemm_shape(weight_shape: Sequence[int]) -> tuple[int, int]:
    """``(N, K)``: the GEMM view of a weight of this shape."""
    shape = tuple(int(s) for s in weight_shape)
    if len(shape) < 2:
        raise ValueError(f"a masked weight needs at least 2 dimensions, got shape {shape}")
    return shape[0], math.prod(shape[1:])


def words_per_row(k: int) -> int:
    """Number of int32 words holding one row of ``k`` mask bits."""
    return (int(k) + WORD_BITS - 1) // WORD_BITS


def packed_shape(weight_shape: Sequence[int], num_tasks: int | None = None) -> tuple[int, ...]:
    """Shape of the packed words for one task (``num_tasks=None``) or a bank of tasks."""
    n, k = gemm_shape(weight_shape)
    one = (n, words_per_row(k))
    return one if num_tasks is None else (int(num_tasks),) + one


def packed_nbytes(weight_shape: Sequence[int], num_tasks: int = 1) -> int:
    """Bytes taken by ``num_tasks`` packed masks of a weight of this shape."""
    return math.prod(packed_shape(weight_shape, num_tasks)) * 4


def __getattr__(name: str):
    # pack / unpack (masks of a weight's own shape <-> words) run through the ops; they live in
    # supsup_fast.ops.bits and are reachable here too, without this module importing the package
    if name in ("pack", "unpack"):
        import importlib

        return getattr(importlib.import_module("supsup_fast.ops"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
