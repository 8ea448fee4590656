"""Ternary linear layers: ``y = x (W * M)^T + b`` with ``W = +-scale`` regenerated from a seed.

A SupSup layer over a signed-constant base is ternary: ``W * M`` is ``+scale``, ``-scale`` or 0.
Its signs come from the seed (:mod:`supsup_fast.seed_format`) and its mask is one bit per weight,
so the kernel reads 1/32 of the bytes of the float32 layer it replaces: the mask words only.

The ops are defined in :mod:`supsup_fast.ops.ternary` (``torch.ops.supsup_fast.ternary_linear``,
its input gradient, ``seeded_fill_``) and specified by :mod:`supsup_fast.backends.reference`.
On CPU (float32, compiled extension) the ``cpu_ext`` backend runs ``csrc/cpu/ternary.cpp``: the
signs of 32 weights are one hash in seed format 2 (32 hashes in format 1, which still works, more
slowly); per group of 4 activations the 16 partial sums are tabulated once per call and each row's
4 positive (negative) weights are one table lookup. Its float32 order is fixed and documented
there, so its result does not depend on the thread count or the instruction set (AVX-512 where the
CPU has it and ``SUPSUP_FAST_NO_AVX512`` is unset, as for the masked GEMM; else AVX2; else scalar:
:func:`kernel_isa` says which). On CUDA the ``triton`` backend serves ``ternary_linear``; every
other device and dtype runs the reference (materialise ``W * M``, then ``F.linear``).
"""

from __future__ import annotations

from .backends.cpu import ternary_isa as kernel_isa
from .ops.ternary import seeded_fill_, ternary_linear, ternary_linear_grad_input

__all__ = ["ternary_linear", "ternary_linear_grad_input", "seeded_fill_", "kernel_isa"]
