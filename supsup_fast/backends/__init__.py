"""The backends: one module each, each a table ``op -> kernel`` plus per-op checks.

:func:`register_all` registers, once: ``reference`` always (every op, every device); ``cpu_ext`` if
the compiled extension loads; ``cuda`` if the extension has its CUDA kernels; ``triton`` if a CUDA
device is present and ``triton`` imports. ``import supsup_fast`` calls it; nothing registers as a
side effect of importing a module.

Adding a backend: a module with a ``backend() -> ops.Backend`` (its ``impls`` keyed by op name, its
``checks`` saying why it declines an input), and a line here. See CONTRIBUTING.md.
"""

from __future__ import annotations

import torch

from .. import ops
from . import cpu, cuda, reference, triton

_registered = False


def register_all() -> None:
    """Register every backend this installation can run (idempotent)."""
    global _registered
    if _registered:
        return
    ops.register_backend(ops.Backend(name="reference", priority=0, devices=("cpu", "cuda", "meta", "mps", "xpu"),
                                     impls=reference.impls(ops.op_names())))
    ops.register_backend(cpu.backend())
    ops.register_backend(cuda.backend())
    if torch.cuda.is_available():
        triton.register_triton()
    else:
        ops.register_backend(triton.unavailable("no CUDA device (register_triton() registers it for other devices)"))
    _registered = True
