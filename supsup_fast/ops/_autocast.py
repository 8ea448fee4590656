"""``torch.autocast`` for the masked matmuls: cast their floating inputs as autocast casts ``F.linear``'s.

Inside an autocast region ``F.linear`` runs in the region's lower-precision dtype (fp16/bf16),
whatever the dtypes of its input and weight. The masked ops are custom ops, which autocast does
not see, so their entry points call :func:`linear_args` first: same casts, same result dtype, and
the casts are ordinary differentiable ops (gradients flow back in the original dtypes).
"""

from __future__ import annotations

from typing import Optional

import torch

_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")
# one thread-local read that is False outside every autocast region (the common case)
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def enabled(device_type: str) -> bool:
    """Whether an autocast region is active for ``device_type`` (cheap: called on every matmul)."""
    return _any_enabled() and device_type in _AUTOCAST_DEVICES and _dtype_for(device_type) is not None


def _dtype_for(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type`` tensors, or ``None``."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):  # torch without per-device autocast queries
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def linear_args(x: torch.Tensor, *tensors: Optional[torch.Tensor]):
    """``(x, *tensors)`` cast to the autocast dtype of ``x``'s device where autocast is on (floating
    tensors only, ``None`` passes through); unchanged otherwise."""
    dtype = _dtype_for(x.device.type)
    if dtype is None:
        return (x, *tensors)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t for t in (x, *tensors)]
    return tuple(cast)
