"""Triton kernels and their launchers only: no autograd, no module logic.

The source folder is the repository's top-level ``kernels/``; ``setup.py`` installs it as the
subpackage ``supsup_fast.kernels`` (``package_dir``), which is the name code imports. The
``triton`` backend (:mod:`supsup_fast.backends.triton`) maps the ops onto these launchers.

* :mod:`.masked_matmul` — fused masked GEMM / split-K forward, ``dX``, the score gradient, the
  grouped (per-row task) and the seeded (weight regenerated from a hash) matmuls;
* :mod:`.mask_ops` — pack / unpack, ``W*M``, superposition, mask dot products and the
  signed-constant fill;
* :mod:`._common` — in-register mask-bit unpacking, the hash, autotuning configs;
* :mod:`.seed_format` — seed format 2's sign words (one hash per 32 weights) as ``tl`` functions.

Importing this package imports nothing from Triton, so it works where Triton is missing; the
submodules need ``triton``. Set ``TRITON_INTERPRET=1`` before importing them to run the kernels
on CPU tensors.
"""
