"""The paper's architectures as plain ``torch.nn`` models (convert them with ``convert_``).

Bias-free, as SupSup's base networks are: the frozen weights are signed Kaiming constants
and the mask is the only thing learned. ``outputs`` may exceed the number of real classes:
the extra ("superfluous") neurons are what the G objective of task inference reads.
"""

from __future__ import annotations

from torch import nn

from ..errors import SupsupError


def mlp(sizes: list[int]) -> nn.Sequential:
    """``Linear -> ReLU`` stack over ``sizes`` (input, hidden..., outputs), no biases, flat input."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise SupsupError(f"mlp needs at least input and output sizes >= 1, got {sizes}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet_300_100(outputs: int = 100, inputs: int = 784) -> nn.Sequential:
    """LeNet-300-100: ``784-300-100-outputs`` (the paper's PermutedMNIST network)."""
    return mlp([inputs, 300, 100, outputs])


def fc_1024(outputs: int = 100, inputs: int = 784) -> nn.Sequential:
    """FC-1024-1024: ``784-1024-1024-outputs``."""
    return mlp([inputs, 1024, 1024, outputs])


class BasicBlock(nn.Module):
    """ResNet basic block with BatchNorm (converted to per-task BatchNorm by ``convert_``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, affine=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, affine=False))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """The reduced ResNet-18 of GEM / SupSup's SplitCIFAR100 (width ``nf`` = 20)."""

    def __init__(self, outputs: int = 100, nf: int = 20, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf, affine=False)
        self.relu = nn.ReLU()
        widths = [nf, 2 * nf, 4 * nf, 8 * nf]
        blocks, cin = [], nf
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * nf, outputs, bias=False)

    def forward(self, x):
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.linear(self.pool(out).flatten(1))


ARCHITECTURES = {
    "lenet": lenet_300_100,
    "fc1024": fc_1024,
    "resnet18": ReducedResNet18,
}


def build(arch: str, outputs: int, input_shape: tuple) -> nn.Module:
    """One of :data:`ARCHITECTURES` for inputs of ``input_shape`` (without the batch dim)."""
    if arch not in ARCHITECTURES:
        raise SupsupError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if arch == "resnet18":
        if len(input_shape) != 3:
            raise SupsupError(f"resnet18 needs image inputs [C, H, W], got input shape {input_shape}")
        return ReducedResNet18(outputs, in_channels=input_shape[0])
    inputs = 1
    for s in input_shape:
        inputs *= int(s)
    return ARCHITECTURES[arch](outputs, inputs=inputs)
