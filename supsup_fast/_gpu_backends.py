"""The GPU backends' former module: ``register_triton`` and the CUDA signed-constant fill, kept importable."""

from __future__ import annotations

import torch

from .backends.triton import register_triton, triton_impls  # noqa: F401


def signed_constant_fill_(out: torch.Tensor, seed: int, layer: int, scale: float) -> torch.Tensor:
    """Fill a contiguous CUDA tensor with the signed constant ``+-scale`` in place (CUDA extension)."""
    torch.ops.supsup_fast_C.signed_constant_fill_(out, int(seed), int(layer), float(scale))
    return out
