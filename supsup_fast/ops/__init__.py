"""The op layer: every computation the library dispatches, as validated functions over ``torch.library`` ops.

Each op is defined once in the ``supsup_fast`` namespace (``torch.ops.supsup_fast.<op>``) with a
fake kernel (``torch.compile``, ``opcheck``) and its autograd, in the module of its concept:

=============  ==========================================================================
``bits``       ``pack_masks``, ``unpack_masks`` (and the weight-shaped ``pack`` / ``unpack``)
``linear``     ``apply_mask``, ``masked_linear`` and their gradients (incl. the score gradient)
``conv``       ``masked_conv2d``
``bank``       ``superpose``, ``mask_dots`` (the superposition and its alpha gradient)
``grouped``    ``masked_linear_grouped`` and its input gradient (one task per row)
``seeded``     ``signed_constant_fill_``, ``masked_linear_seeded`` (the base regenerated from its seed)
``ternary``    ``seeded_fill_``, ``ternary_linear`` and its input gradient (seed formats 1 and 2, mask words only)
``binarise``   ``largest_k``, ``topk_words``, ``threshold_words`` (the binarisers' selections)
=============  ==========================================================================

An op's real kernel asks the registry (:mod:`._registry`) for a backend: the first, by
priority, that implements the op for the inputs' device and dtype and does not decline them.
Backends (registered by :func:`supsup_fast.backends.register_all`):

=============  ========================================================================
``cuda``       C++/CUDA kernels (``csrc/cuda``), when the extension was built with CUDA
``triton``     Triton kernels (``kernels/``, installed as ``supsup_fast.kernels``) on CUDA tensors
``cpu_ext``    C++ CPU kernels (``csrc/cpu``), the compiled extension ``supsup_fast._C``
``reference``  pure PyTorch (:mod:`supsup_fast.backends.reference`), every device, always available
=============  ========================================================================

``SUPSUP_FAST_BACKEND=<name>`` (or ``op=name,op=name``) forces a backend, as does
:func:`force_backend`; a forced backend that declines an input raises
:class:`~supsup_fast.errors.BackendError` with its reason. ``python -m supsup_fast info`` prints
what serves every op. Eager calls skip the dispatcher where nothing is lost (:mod:`._fastpath`).
"""

# isort: off
# the op modules define their ops on import, in this order (the order `info` lists them in)
from . import bits, linear, conv, bank, grouped, seeded, ternary, binarise  # noqa: F401
# isort: on
from ..errors import BackendError
from ._registry import (
    ENV_BACKEND,
    FLOAT_DTYPES,
    Backend,
    backends,
    choose,
    force_backend,
    forced_backends,
    get_backend,
    op_names,
    register_backend,
)
from .bank import mask_dots, superpose
from .binarise import largest_k, threshold_words, topk_words
from .bits import pack, pack_masks, unpack, unpack_masks
from .conv import masked_conv2d
from .grouped import masked_linear_grouped, masked_linear_grouped_grad_input
from .linear import (
    apply_mask,
    masked_linear,
    masked_linear_grad_input,
    masked_weight_grad,
    masked_weight_grad_sign,
)
from .seeded import masked_linear_seeded, signed_constant_fill_
from .ternary import seeded_fill_, ternary_linear, ternary_linear_grad_input


def __getattr__(name: str):
    # the op names, read once the backends have registered (new ops may be declared later)
    if name == "OPS":
        return op_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendError", "Backend", "ENV_BACKEND", "FLOAT_DTYPES", "backends", "choose", "force_backend",
    "forced_backends", "get_backend", "op_names", "register_backend",
    "pack", "unpack", "pack_masks", "unpack_masks", "apply_mask", "masked_linear", "masked_linear_grad_input",
    "masked_weight_grad", "masked_weight_grad_sign", "masked_conv2d", "superpose", "mask_dots",
    "masked_linear_grouped", "masked_linear_grouped_grad_input", "masked_linear_seeded", "signed_constant_fill_",
    "seeded_fill_", "ternary_linear", "ternary_linear_grad_input",
    "largest_k", "topk_words", "threshold_words",
]
