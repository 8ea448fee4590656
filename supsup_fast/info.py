"""What is active: versions, the compiled extension, and which backend serves each op."""

from __future__ import annotations

import os
import platform

import torch

from . import ops
from ._native import EXT_ERROR, EXT_LOADED, ext_has_cuda


def collect() -> dict:
    """Versions, extension status, every backend (with why it is unavailable) and the op -> backend table."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # triton is optional
        triton_version = f"not importable ({e})"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for dev in devices:
        for op in ops.OPS:
            try:
                table[f"{op}@{dev}"] = ops.choose(op, dev, torch.float32).name
            except ops.BackendError as e:
                table[f"{op}@{dev}"] = f"none ({e})"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "extension_loaded": EXT_LOADED,
        "extension_error": EXT_ERROR,
        "extension_cuda": ext_has_cuda(),
        "forced": os.environ.get(ops.ENV_BACKEND, ""),
        "backends": {
            b.name: ("available" if b.available else f"unavailable: {b.why_unavailable}") for b in ops.backends()
        },
        "ops": table,
    }


def render(info: dict) -> str:
    lines = [f"supsup_fast on {info['device']} ({info['threads']} threads)"]
    lines += [f"  {k}: {info[k]}" for k in ("python", "torch", "triton", "cuda_available")]
    ext = "loaded" if info["extension_loaded"] else f"NOT loaded ({info['extension_error']})"
    lines.append(f"  compiled extension: {ext}" + (" with CUDA kernels" if info["extension_cuda"] else ""))
    if info["forced"]:
        lines.append(f"  forced by {ops.ENV_BACKEND}: {info['forced']}")
    lines.append("backends (highest priority first):")
    lines += [f"  {name:10s} {state}" for name, state in info["backends"].items()]
    lines.append("op -> backend (float32):")
    lines += [f"  {k:34s} {v}" for k, v in info["ops"].items()]
    return "\n".join(lines)
