"""The compiled extension ``supsup_fast._C``: loaded once, or the reason it is not.

It holds the C++ kernels (``csrc/``) as ops of the private ``supsup_fast_C`` namespace, registered
for the CPU key (and the CUDA key when built with CUDA), plus a few directly bound helpers. If it
is missing, one warning is given and the pure-PyTorch reference backend serves.

On x86-64 the kernels come in two builds of the same sources (``setup.py``): ``_C`` for any x86-64
CPU and ``_C_avx2`` for x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE). Exactly one is loaded
(both register the same ops): ``_C_avx2`` where the CPU has all of that (Linux: the kernel's
``/proc/cpuinfo`` flags, which also say the OS saves the AVX state), ``_C`` otherwise.
``SUPSUP_FAST_CPU=baseline`` loads ``_C`` whatever the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import warnings

ENV_NO_EXT = "SUPSUP_FAST_NO_EXT"  # set to 1 to ignore the compiled extension at import
ENV_CPU = "SUPSUP_FAST_CPU"  # "baseline": load the baseline build even on an AVX2 CPU

#: /proc/cpuinfo flags of x86-64-v3, the target of ``_C_avx2`` (``abm`` is how Linux names LZCNT)
X86_64_V3_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")


def cpu_has_x86_64_v3() -> bool:
    """Whether this CPU (and OS) runs x86-64-v3 code; ``False`` where it cannot be told."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return all(fl in flags for fl in X86_64_V3_FLAGS)
    except OSError:
        pass
    return False


def _module_name() -> str:
    if os.environ.get(ENV_CPU, "") != "baseline" and cpu_has_x86_64_v3() and \
            importlib.util.find_spec("supsup_fast._C_avx2") is not None:
        return "supsup_fast._C_avx2"
    return "supsup_fast._C"


EXT_ERROR: str | None = None
EXT_MODULE: str | None = None  # the module loaded: supsup_fast._C or supsup_fast._C_avx2
try:
    if os.environ.get(ENV_NO_EXT, "") not in ("", "0"):
        raise ImportError(f"{ENV_NO_EXT} is set")
    EXT_MODULE = _module_name()
    _C = importlib.import_module(EXT_MODULE)
    # `supsup_fast._C` names the build in use: importing the other build too would register every op twice
    sys.modules["supsup_fast._C"] = _C
except ImportError as e:  # pragma: no cover - exercised by installs without a compiler
    _C = None
    EXT_MODULE = None
    EXT_ERROR = str(e)
    if os.environ.get(ENV_NO_EXT, "") in ("", "0"):
        warnings.warn(
            f"supsup_fast: compiled extension not loaded ({e}); using the pure-PyTorch reference path. "
            "Reinstall with `pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=2,
        )

EXT_LOADED = _C is not None


def ext_has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return EXT_LOADED and bool(getattr(_C, "WITH_CUDA", False))
