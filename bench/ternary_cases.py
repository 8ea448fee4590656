"""Workloads and providers of the ternary-layer benchmarks (the pytest group and ternary_table.py).

One linear layer over a signed-constant base, one task, float32, M rows of x. Providers:
  dense                                  F.linear(x, W, b): the layer SupSup replaces (reads 4 NK bytes)
  supsup_fast[masked_linear]             ops.masked_linear(x, W, words, b): fp32 W + mask bits
  supsup_fast[masked_linear_seeded]      ops.masked_linear_seeded: W regenerated from the seed
                                         (seed format 1, one hash per weight)
  supsup_fast[ternary_linear]            supsup_fast.ternary.ternary_linear, seed format 2:
                                         reads the mask words only (NK/8 bytes)
  supsup_fast[ternary_linear_v1]         the same kernel on a format-1 base (32 hashes per word)
Each provider's output is checked against float64 on the weights it uses before it is timed.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from supsup_fast import ops, seed_format, ternary
from supsup_fast import reference as ref

SEED, LAYER = 20, 3
# the shapes of the issue: one large layer, FC-1024-1024 and LeNet-300-100 layers
FULL_SHAPES = [(4096, 4096), (1024, 784), (1024, 1024), (200, 1024), (100, 1024), (300, 784), (100, 300), (100, 100)]
TINY_SHAPES = [(300, 784), (37, 70)]
FULL_ROWS = [1, 2, 4, 8]
TINY_ROWS = [1, 5]
PROVIDERS = [
    "dense",
    "supsup_fast[masked_linear]",
    "supsup_fast[masked_linear_seeded]",
    "supsup_fast[ternary_linear]",
    "supsup_fast[ternary_linear_v1]",
]
REL_TOL = 1e-5  # ||out - exact|| / ||exact|| in float32 against float64


def layer_name(n: int, k: int) -> str:
    return {(4096, 4096): "big", (1024, 784): "fc1024.fc1", (1024, 1024): "fc1024.fc2", (200, 1024): "fc1024.fc3-200",
            (100, 1024): "fc1024.fc3", (300, 784): "lenet.fc1", (100, 300): "lenet.fc2",
            (100, 100): "lenet.fc3"}.get((n, k), f"{n}x{k}")


def build(n: int, k: int, m: int, seed: int = 0) -> dict:
    """Inputs shared by every provider: x, bias, one task's mask, the v1 / v2 bases and scale."""
    g = torch.Generator().manual_seed(seed)
    scale = math.sqrt(2.0) / math.sqrt(k)
    mask = torch.rand(n, k, generator=g) < 0.5
    return {
        "x": torch.randn(m, k, generator=g),
        "b": torch.randn(n, generator=g),
        "words": ref.pack_masks(mask),
        "mask": mask,
        "scale": scale,
        "w_v1": seed_format.signed_constant_from_scale(SEED, LAYER, n, k, scale, version=1),
        "w_v2": seed_format.signed_constant_from_scale(SEED, LAYER, n, k, scale, version=2),
    }


def provider_fn(provider: str, d: dict) -> Callable[[], torch.Tensor]:
    x, b, words, scale = d["x"], d["b"], d["words"], d["scale"]
    w = d["w_v1"]  # today's signed-constant layers hold the format-1 base
    return {
        "dense": lambda: F.linear(x, w, b),
        "supsup_fast[masked_linear]": lambda: ops.masked_linear(x, w, words, b),
        "supsup_fast[masked_linear_seeded]": lambda: ops.masked_linear_seeded(x, words, SEED, LAYER, scale, b),
        "supsup_fast[ternary_linear]": lambda: ternary.ternary_linear(x, words, SEED, LAYER, scale, b, 2),
        "supsup_fast[ternary_linear_v1]": lambda: ternary.ternary_linear(x, words, SEED, LAYER, scale, b, 1),
    }[provider]


def expected(provider: str, d: dict) -> torch.Tensor:
    """float64 evaluation of what ``provider`` computes."""
    x, b = d["x"].double(), d["b"].double()
    if provider == "dense":
        return F.linear(x, d["w_v1"].double(), b)
    w = d["w_v2"] if provider == "supsup_fast[ternary_linear]" else d["w_v1"]
    return F.linear(x, w.double() * d["mask"].double(), b)


def rel_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(provider: str, d: dict) -> float:
    with torch.no_grad():
        out = provider_fn(provider, d)()
    err = rel_error(out, expected(provider, d))
    assert out.shape == (d["x"].shape[0], d["b"].shape[0]) and err <= REL_TOL, (provider, err)
    return err


def fewest_bytes(provider: str, n: int, k: int, m: int) -> float:
    """Bytes a provider must read or write: x, y, bias, and its weight operand."""
    io = 4 * (m * k + m * n + n)
    weight = {"dense": 4 * n * k, "supsup_fast[masked_linear]": (4 + 1 / 8) * n * k}.get(provider, n * k / 8)
    return io + weight


def table_lookups(n: int, k: int, m: int) -> int:
    """Lookups the ternary kernel makes: 2 planes x 8 groups per mask word x rows x rows of x."""
    return 2 * 8 * ((k + 31) // 32) * n * m
