"""The one place where the ``torch.library`` dispatcher is skipped.

When it is taken: the call is eager (not traced by ``torch.compile`` or ``torch.jit.trace``, no dispatch mode such as
``FakeTensorMode`` or ``TorchDispatchMode`` active, no functorch transform such as ``vmap``), every
tensor argument is a plain ``torch.Tensor`` / ``nn.Parameter`` (no subclass), and -- for
:func:`call` -- autograd has nothing to record (grad mode off, or no argument requires grad).
Then the kernel the registry picks is called directly.

Why: the dispatcher's boxing, its autograd wrapper and the Python round trip of a
``CompositeExplicitAutograd`` kernel cost tens of microseconds per call, which is most of a small
layer's time (a 100x100 GEMV takes ~6 us). The direct call runs the same kernel on the same
arguments, so results are bit-identical either way; every other call goes through the op, which is
what ``torch.compile``, ``opcheck``, subclasses and autograd see.

The smallest layers go one step further: an op whose chosen backend has an *eager entry*
(:attr:`~._registry.Backend.eager`; ``ternary_linear`` and ``masked_linear`` on ``cpu_ext``) hands
the whole call to one native function, which makes the same tests (plain tensors, nothing for
autograd, no dispatch mode, tracer, functorch transform or CPU autocast) and the argument checks in C++
and returns ``None`` for any call it does not serve; the op then runs its checked path below. A
100x100 ternary layer at one row computes in ~1.5 us, and the Python around it cost ~4.5 us.

Where autograd *does* have something to record, :func:`plain_eager` lets an op module record it
with a plain ``torch.autograd.Function`` around the same kernel and the op's own backward, instead
of the dispatcher's autograd wrapper (see ``linear.py`` and ``conv.py``).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _registry
from ._define import DEFS, NAMESPACE

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced() -> bool:
    """Whether tensors are being traced or transformed: torch.compile, torch.jit.trace (it records
    only what goes through the dispatcher), a dispatch mode, or a functorch transform (a vmapped
    tensor has no storage a kernel could read)."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None)


def plain_eager(args) -> bool:
    """Whether a call may bypass the dispatcher's wrappers: not :func:`traced`, plain tensors only."""
    if traced():
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


def direct(args) -> bool:
    """Whether a call may skip the dispatcher altogether: :func:`plain_eager` with no autograd to record."""
    if traced():
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # one loop: this runs on every eager call
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or (grad and a.requires_grad)):
            return False
    return True


def eager(name: str, *args):
    """The result of ``name``'s eager entry (:func:`~._registry.eager_entry`) on these arguments, or
    ``None`` where there is none, ``torch.compile`` is tracing, or the entry declines the call."""
    if torch.compiler.is_compiling():
        return None
    entry = _registry.eager_entry(name)
    return None if entry is None else entry(*args)


def call(name: str, *args):
    """``torch.ops.supsup_fast.<name>(*args)``, or its kernel directly when :func:`direct` allows."""
    if direct(args):
        d = DEFS[name]
        if d.pick is not None:
            args = d.pick(args)
        return _registry.kernel(d.runs, args)(*args)
    return getattr(NAMESPACE, name)(*args)


class _Fast:
    """``fast.<op>(*args)`` is :func:`call` ``("<op>", *args)``."""

    def __getattr__(self, name: str):
        if name not in DEFS:
            raise AttributeError(name)

        def bound(*args):
            return call(name, *args)

        bound.__name__ = name
        setattr(self, name, bound)
        return bound


fast = _Fast()
