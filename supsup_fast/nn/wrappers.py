"""SupSup twins of layers whose forward does more than the torch layer they derive from.

timm builds EfficientNet / MobileNet / RegNet from a BatchNorm that applies its own activation
(``BatchNormAct2d``) and, for TensorFlow-ported weights, a Conv2d that pads its input dynamically
to TensorFlow's "same" (``Conv2dSame``). Swapping those for a plain :class:`TaskBatchNorm` /
:class:`MaskedConv2d` would drop the activation or the padding; these modules keep them:

* :class:`TaskBatchNormAct` -- per-task statistics, then the original module's ``drop`` and ``act``
  children, unchanged;
* :class:`SamePadConv2d` -- :class:`SamePad2d` (the dynamic padding) followed by a zero-padding
  :class:`MaskedConv2d` child ``conv``, so the masked layer sees the padded input, as its per-example
  task-inference gradients need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .masked import MaskedConv2d
from .norm import TaskBatchNorm


class TaskBatchNormAct(TaskBatchNorm):
    """:class:`TaskBatchNorm` followed by ``drop`` and ``act`` (timm's ``BatchNormAct2d`` order)."""

    def __init__(self, *args, drop: nn.Module, act: nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding of TensorFlow's "same" for one spatial dimension (timm's ``get_same_padding``)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class SamePad2d(nn.Module):
    """Pad ``[B, C, H, W]`` so a conv of this kernel, stride and dilation gives ``ceil(H / stride)`` rows: the
    extra row or column goes to the bottom / right, as TensorFlow does."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph == 0 and pw == 0:
            return x
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class SamePadConv2d(nn.Module):
    """TensorFlow-"same" padding, then a masked conv without padding (the twin of timm's ``Conv2dSame``)."""

    def __init__(self, conv: MaskedConv2d) -> None:
        super().__init__()
        self.pad = SamePad2d(conv.kernel_size, conv.stride, conv.dilation)
        self.conv = conv

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))
