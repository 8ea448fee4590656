"""Packing masks into the bit format of :mod:`supsup_fast.format` and back.

* ``pack_masks`` -- masks ``[..., N, K]`` (non-zero = kept) -> int32 words ``[..., N, ceil(K/32)]``;
* ``unpack_masks`` -- words -> masks ``[..., N, k]`` of any dtype;
* :func:`pack` / :func:`unpack` -- the same for masks of a weight's own shape (a conv kernel
  ``[O, I/g, kh, kw]`` is packed over its ``[O, I/g * kh * kw]`` view).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..format import gemm_shape, words_per_row
from ._checks import require
from ._define import define, on_first_device
from ._fastpath import call


def _pack_masks_fake(masks):
    return masks.new_empty((*masks.shape[:-1], words_per_row(masks.shape[-1])), dtype=torch.int32)


def _unpack_masks_fake(words, k, dtype):
    return words.new_empty((*words.shape[:-1], k), dtype=dtype)


def _check_pack(masks) -> None:
    require(isinstance(masks, torch.Tensor), lambda: f"pack_masks needs a tensor, got {type(masks).__name__}")
    require(masks.dim() >= 2,
            lambda: f"pack_masks needs masks of at least 2 dims [.., N, K], got shape {tuple(masks.shape)}")


def _check_unpack(words, k, dtype) -> None:
    require(isinstance(words, torch.Tensor),
            lambda: f"unpack_masks needs a tensor of words, got {type(words).__name__}")
    require(words.dtype == torch.int32, lambda: f"unpack_masks needs int32 words, got {words.dtype}")
    require(words.dim() >= 2, lambda: f"unpack_masks needs words of at least 2 dims, got shape {tuple(words.shape)}")
    require(not isinstance(k, bool) and isinstance(k, (int, torch.SymInt)) and k >= 0,
            lambda: f"unpack_masks: k must be a non-negative int (bits per row), got {k!r}")
    require(
        words.shape[-1] == words_per_row(k),
        lambda: f"unpack_masks: {words.shape[-1]} words per row cannot hold k={k} bits (needs {words_per_row(k)})",
    )
    require(isinstance(dtype, torch.dtype), lambda: f"unpack_masks: dtype must be a torch.dtype, got {dtype!r}")


define("pack_masks(Tensor masks) -> Tensor", dispatch=on_first_device, fake=_pack_masks_fake, check=_check_pack)
define("unpack_masks(Tensor words, SymInt k, ScalarType dtype) -> Tensor", dispatch=on_first_device,
       fake=_unpack_masks_fake, check=_check_unpack)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Masks ``[..., N, K]`` (non-zero = kept) -> int32 words ``[..., N, ceil(K/32)]``."""
    _check_pack(masks)
    return call("pack_masks", masks)


def unpack_masks(words: torch.Tensor, k: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """int32 words ``[..., N, W]`` -> masks ``[..., N, k]`` of ``dtype``."""
    _check_unpack(words, k, dtype)
    return call("unpack_masks", words, k, dtype)


def pack(masks: torch.Tensor, weight_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Pack masks of shape ``[..., *weight_shape]`` into words ``[..., N, W]``.

    ``weight_shape`` defaults to the last two dimensions of ``masks`` (a linear layer).
    """
    if weight_shape is None:
        weight_shape = masks.shape[-2:]
    weight_shape = tuple(int(s) for s in weight_shape)
    nd = len(weight_shape)
    require(
        masks.dim() >= nd and tuple(masks.shape[masks.dim() - nd:]) == weight_shape,
        lambda: f"pack: masks of shape {tuple(masks.shape)} do not end in the weight shape {weight_shape}",
    )
    n, k = gemm_shape(weight_shape)
    lead = tuple(masks.shape[: masks.dim() - nd])
    return pack_masks(masks.reshape(lead + (n, k)))


def unpack(words: torch.Tensor, weight_shape: Sequence[int], dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack`: words ``[..., N, W]`` to masks ``[..., *weight_shape]``."""
    weight_shape = tuple(int(s) for s in weight_shape)
    n, k = gemm_shape(weight_shape)
    require(
        words.dim() >= 2 and tuple(words.shape[-2:]) == (n, words_per_row(k)),
        lambda: f"unpack: words of shape {tuple(words.shape)} do not match weight shape {weight_shape} "
        f"(expected [..., {n}, {words_per_row(k)}])",
    )
    lead = tuple(words.shape[:-2])
    return unpack_masks(words, k, dtype).reshape(lead + weight_shape)
