"""What is active: versions, the compiled extension, and which backend serves each op."""

from __future__ import annotations

import os
import platform

import torch

from . import ops
from .backends._ext import EXT_ERROR, EXT_LOADED, EXT_MODULE, ext_has_cuda


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        for op in ops.op_names():
            try:
                table[f"{op}@{dev}"] = ops.choose(op, dev, torch.float32).name
            except ops.BackendError as e:
                table[f"{op}@{dev}"] = f"none ({e})"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "extension_loaded": EXT_LOADED,
        "extension_module": EXT_MODULE,
        "extension_error": EXT_ERROR,
        "extension_cuda": ext_has_cuda(),
        "cpu_avx512_gemm": avx512_gemm_state(),
        "ternary_kernel": ternary_kernel_state(),
        "forced": os.environ.get(ops.ENV_BACKEND, ""),
        "backends": {
            b.name: ("available" if b.available else f"unavailable: {b.why_unavailable}") for b in ops.backends()
        },
        "ops": table,
    }


def avx512_gemm_state() -> str:
    """Whether masked_linear's many-row fp32 CPU kernel is the AVX-512 masked GEMM."""
    if not EXT_LOADED:
        return "no (extension not loaded)"
    from . import _C

    if not _C.cpu_has_avx512():
        return "no (the CPU has no AVX-512F)"
    return "yes" if _C.avx512_enabled() else "no (switched off: SUPSUP_FAST_NO_AVX512=1 or _C.set_avx512_enabled)"


def ternary_kernel_state() -> str:
    """The instruction set of the ternary CPU kernel (supsup_fast.ternary), or why there is none."""
    if not EXT_LOADED:
        return "none (extension not loaded)"
    from . import _C

    return _C.ternary_isa()


def render(info: dict) -> str:
    lines = [f"supsup_fast on {info['device']} ({info['threads']} threads)"]
    lines += [f"  {k}: {info[k]}" for k in ("python", "torch", "triton", "cuda_available")]
    build = {"supsup_fast._C_avx2": "the x86-64-v3 (AVX2) build", "supsup_fast._C": "the baseline build"}
    ext = (f"loaded ({build.get(info.get('extension_module'), info.get('extension_module'))})"
           if info["extension_loaded"] else f"NOT loaded ({info['extension_error']})")
    lines.append(f"  compiled extension: {ext}" + (" with CUDA kernels" if info["extension_cuda"] else ""))
    lines.append(f"  AVX-512 masked GEMM: {info['cpu_avx512_gemm']}")
    lines.append(f"  ternary kernel (supsup_fast.ternary): {info['ternary_kernel']}")
    if info["forced"]:
        lines.append(f"  forced by {ops.ENV_BACKEND}: {info['forced']}")
    lines.append("backends (highest priority first):")
    lines += [f"  {name:10s} {state}" for name, state in info["backends"].items()]
    lines.append("op -> backend (float32):")
    lines += [f"  {k:38s} {v}" for k, v in info["ops"].items()]
    return "\n".join(lines)
