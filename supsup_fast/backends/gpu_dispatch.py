"""Which GPU implementation runs an op, chosen by measured speed per shape class.

A *dispatch table* records, for one GPU model, the median time of every candidate provider of an
op in each shape class; the fastest one runs. ``bench/gpu/roofline.py`` measures and writes such a
table (``dispatch.json``); tables are looked up by the device's name in

1. the file named by ``SUPSUP_FAST_DISPATCH_TABLE`` (any device), then
2. ``supsup_fast/backends/dispatch_tables/<device slug>.json`` (tables committed after a GPU run).

Where no table holds a class, :data:`DEFAULTS` decides. The defaults are *not measured*: they
follow the offline estimates of ``bench/results/offline-sm90`` and are replaced by the first
measured table. Providers:

``masked_linear`` / ``masked_linear_grad_input``
    ``fused`` (the Triton masked GEMV/GEMM) or ``two_pass`` (``apply_mask`` then cuBLAS).
``pack_masks``, ``unpack_masks``, ``superpose``, ``mask_dots``, ``masked_linear_seeded``
    ``cuda`` (the extension's kernels) or ``triton``.

This module imports only torch; lookups are a dict access once a device's table is loaded.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

FORMAT = "supsup_fast-gpu-dispatch/1"
ENV_TABLE = "SUPSUP_FAST_DISPATCH_TABLE"
TABLE_DIR = Path(__file__).with_name("dispatch_tables")

# Offline defaults, (op, class) -> provider, "*" = any class of the op. Reasons:
# * two_pass above 1024 rows of 16-bit and above 64 rows of fp32: the fused GEMM's mask costs ~2
#   SASS instructions per weight on top of the MMA and Triton 3.6 waits on every wgmma whose A
#   operand is in registers (kernels/aot.py); apply_mask + cuBLAS is estimated at 0.85-0.92x
#   dense there. IEEE fp32 dots compile to FFMA loops at 255 registers, where cuBLAS SGEMM is tuned.
# * pack/unpack: the Triton tiles store 16-byte vectors; the CUDA kernels one element per lane.
# * superpose/mask_dots: the CUDA kernels split over tasks and words with several 16-byte loads in
#   flight; the Triton ones walk all tasks per tile with one reduction (and atomic) per task.
DEFAULTS: dict[tuple[str, str], str] = {
    ("masked_linear", "f16:m<=1024"): "fused",
    ("masked_linear", "f16:m>1024"): "two_pass",
    ("masked_linear", "f32:m<=64"): "fused",
    ("masked_linear", "f32:m>64"): "two_pass",
    ("masked_linear_grad_input", "f16:m<=1024"): "fused",
    ("masked_linear_grad_input", "f16:m>1024"): "two_pass",
    ("masked_linear_grad_input", "f32:m<=64"): "fused",
    ("masked_linear_grad_input", "f32:m>64"): "two_pass",
    ("pack_masks", "*"): "triton",
    ("unpack_masks", "*"): "triton",
    ("superpose", "*"): "cuda",
    ("mask_dots", "*"): "cuda",
    ("masked_linear_seeded", "*"): "cuda",
}

_ROW_CLASSES = (1, 16, 64, 256, 1024, 4096)


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0


def _row_class(m: int) -> str:
    for b in _ROW_CLASSES:
        if m <= b:
            return f"m<={b}"
    return f"m>{_ROW_CLASSES[-1]}"


def _size_class(numel: int) -> str:
    return "n<1M" if numel < 1 << 20 else ("n<64M" if numel < 1 << 26 else "n>=64M")


def _task_class(t: int) -> str:
    return "t<=16" if t <= 16 else ("t<=256" if t <= 256 else "t>256")


def shape_class(op: str, args: Sequence) -> str:
    """The measured classes: dtype family and row count for the matmuls, sizes for the streams."""
    if op in ("masked_linear", "masked_linear_grad_input", "masked_linear_seeded"):
        x = args[0]
        fam = "f32" if x.dtype == torch.float32 else "f16"
        return f"{fam}:{_row_class(_rows(x))}"
    if op in ("superpose", "mask_dots"):
        bank = args[1]
        return f"{_task_class(bank.shape[0])}:{_size_class(bank.numel() * 32)}"
    return _size_class(args[0].numel() if op != "unpack_masks" else args[0].numel() * 32)


def _default(op: str, klass: str) -> Optional[str]:
    if (op, "*") in DEFAULTS:
        return DEFAULTS[(op, "*")]
    if op.startswith("masked_linear") and ":" in klass:  # fold the fine row classes into the defaults'
        fam, rows = klass.split(":")
        m = 1 << 62 if rows.startswith("m>") else int(rows[3:])
        cut = 1024 if fam == "f16" else 64
        return DEFAULTS.get((op, f"{fam}:m<={cut}" if m <= cut else f"{fam}:m>{cut}"))
    return None


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_table(path: os.PathLike, allow_dry_run: bool = False) -> dict:
    """A dispatch table from JSON, checked: ``{"format", "device", "classes": {op: {class: {provider: us}}}}``.
    A dry run's table (CPU timings of the CPU stand-ins) is refused unless ``allow_dry_run``."""
    with open(path) as f:
        table = json.load(f)
    if table.get("format") != FORMAT or not isinstance(table.get("classes"), dict):
        raise ValueError(f"{path}: not a {FORMAT} table")
    if table.get("dry_run") and not allow_dry_run:
        raise ValueError(f"{path}: a dry run's table (not measured on a GPU)")
    for op, classes in table["classes"].items():
        for klass, times in classes.items():
            if not all(isinstance(v, (int, float)) and v > 0 for v in times.values()):
                raise ValueError(f"{path}: {op} {klass}: times must be positive numbers, got {times}")
    return table


@functools.lru_cache(maxsize=16)
def _table_for(device_name: str) -> Optional[dict]:
    env = os.environ.get(ENV_TABLE)
    if env:
        return load_table(env)
    path = TABLE_DIR / f"{device_slug(device_name)}.json"
    return load_table(path) if path.exists() else None


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def table(device: torch.device) -> Optional[dict]:
    """The dispatch table for a CUDA device, or ``None`` (then :data:`DEFAULTS` decide)."""
    if device.type != "cuda":
        return None
    return _table_for(_device_name(device.index if device.index is not None else torch.cuda.current_device()))


_CHOICES: dict = {}  # (op, device, dtype, rows, candidates) -> provider, for the matmuls' hot path


def reset() -> None:
    """Forget loaded tables and choices (after changing ``SUPSUP_FAST_DISPATCH_TABLE`` or the files)."""
    _table_for.cache_clear()
    _CHOICES.clear()


def choose_from(times: Optional[dict], candidates: Sequence[str]) -> Optional[str]:
    """The fastest of ``candidates`` in a ``{provider: time}`` row, or ``None`` if none is there."""
    if not times:
        return None
    timed = [(times[c], c) for c in candidates if c in times]
    return min(timed)[1] if timed else None


def preferred(op: str, args: Sequence, candidates: Sequence[str]) -> Optional[str]:
    """The provider to run ``op`` on these CUDA inputs: the measured fastest of ``candidates`` for
    their shape class, else the default, else ``None`` (no opinion). Memoised per row count for the
    matmuls (a dict lookup per call)."""
    x = args[0]
    memo = None
    if op.startswith("masked_linear"):
        memo = (op, x.device, x.dtype, _rows(x), tuple(candidates))
        hit = _CHOICES.get(memo)
        if hit is not None:
            return hit
    choice = _preferred(op, args, candidates)
    if memo is not None and choice is not None and len(_CHOICES) < 4096:
        _CHOICES[memo] = choice
    return choice


def _preferred(op: str, args: Sequence, candidates: Sequence[str]) -> Optional[str]:
    klass = shape_class(op, args)
    tab = table(args[0].device)
    if tab is not None:
        best = choose_from(tab["classes"].get(op, {}).get(klass), candidates)
        if best is not None:
            return best
    d = _default(op, klass)
    return d if d in candidates else None


# ---- the two-pass providers of the matmuls ---------------------------------------------------
def linear_provider(fused, apply_mask):
    """``masked_linear`` that runs ``fused`` or ``F.linear(x, apply_mask(W, M), b)``, per :func:`preferred`."""

    def masked_linear(x, weight, mask_words, bias=None):
        if x.is_cuda and preferred("masked_linear", (x,), ("fused", "two_pass")) == "two_pass":
            return F.linear(x, apply_mask(weight, mask_words), bias)
        return fused(x, weight, mask_words, bias)

    return masked_linear


def grad_input_provider(fused, apply_mask):
    """``masked_linear_grad_input`` that runs ``fused`` or ``grad_out @ apply_mask(W, M)``."""

    def masked_linear_grad_input(grad_out, weight, mask_words):
        if grad_out.is_cuda and preferred("masked_linear_grad_input", (grad_out,), ("fused", "two_pass")) == "two_pass":
            return grad_out @ apply_mask(weight, mask_words)
        return fused(grad_out, weight, mask_words)

    return masked_linear_grad_input
