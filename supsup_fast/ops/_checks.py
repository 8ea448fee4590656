"""Input validation shared by the public op wrappers: every failure names the argument and the problem."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import SupsupError
from ..format import words_per_row
from ._registry import FLOAT_DTYPES


def require(cond: bool, msg) -> None:
    """Raise :class:`SupsupError` unless ``cond``; ``msg`` may be a callable so the hot path formats nothing."""
    if not cond:
        raise SupsupError(msg() if callable(msg) else msg)


def check_float(name: str, t: torch.Tensor) -> None:
    require(isinstance(t, torch.Tensor), lambda: f"{name} must be a tensor, got {type(t).__name__}")
    require(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def check_words(name: str, words: torch.Tensor, n: int, k: int, lead: int) -> None:
    """``words`` are int32 packed masks ``[N, ceil(K/32)]`` (``lead=0``) or a bank ``[T, N, ceil(K/32)]``
    (``lead=1``)."""
    require(isinstance(words, torch.Tensor),
            lambda: f"{name} must be a tensor of int32 words, got {type(words).__name__}")
    require(words.dtype == torch.int32, lambda: f"{name} must be int32 packed words, got {words.dtype}")
    want = (n, words_per_row(k))
    require(
        words.dim() == 2 + lead and tuple(words.shape[lead:]) == want,
        lambda: f"{name} has shape {tuple(words.shape)}, expected {'[T, ' if lead else '['}{want[0]}, {want[1]}] "
        f"for a weight with N={n}, K={k}",
    )


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    first = None
    for t in tensors.values():
        if t is not None:
            if first is None:
                first = t.device
            elif t.device != first:
                break
    else:
        return
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise SupsupError("tensors are on different devices: " + ", ".join(f"{n}={d}" for n, d in devs.items()))


def check_scores(scores, weight: torch.Tensor) -> None:
    """A mask's scores have its weight's shape."""
    require(isinstance(scores, torch.Tensor), lambda: f"scores must be a tensor, got {type(scores).__name__}")
    require(scores.shape == weight.shape,
            lambda: f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")


def check_bias(bias, n: int, dtype: torch.dtype) -> None:
    """``bias`` is ``None`` or a ``[n]`` tensor of ``dtype``."""
    if bias is None:
        return
    require(isinstance(bias, torch.Tensor), lambda: f"bias must be a tensor or None, got {type(bias).__name__}")
    require(bias.shape == (n,), lambda: f"bias shape {tuple(bias.shape)} != ({n},)")
    require(bias.dtype == dtype, lambda: f"bias dtype {bias.dtype} != x dtype {dtype}")


def gemm_nk(weight: torch.Tensor) -> tuple[int, int]:
    """``(N, K)`` of a weight's GEMM view ``[N, prod(rest)]``."""
    n = weight.shape[0]
    return n, (weight.numel() // n if n else 0)


def flat(t: torch.Tensor) -> torch.Tensor:
    """All leading dimensions folded into rows: ``[..., C] -> [R, C]``."""
    return t.reshape(-1, t.shape[-1])
