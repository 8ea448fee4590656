"""One call defines an op: its ``torch.library`` schema, real kernel, fake kernel and autograd.

Every op of the ``supsup_fast`` namespace (``torch.ops.supsup_fast.<name>``) is created by
:func:`define`. Its real kernel (registered for ``CompositeExplicitAutograd``) asks the registry
for a backend; its fake kernel gives ``torch.compile`` and ``opcheck`` the output's shape.

Most ops are *dispatched*: backends implement them under the same name. A few are *carriers*:
ops that exist only so autograd can route a gradient to an extra argument (the straight-through
ops take the scores of a mask in training); their kernel is another op's, on a subset of the
arguments (``kernel_of=(op, pick)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _registry

LIB = torch.library.Library("supsup_fast", "DEF")  # noqa: TOR901 - the library owns this namespace
NAMESPACE = torch.ops.supsup_fast


@dataclass(frozen=True)
class OpDef:
    """What the fast path needs to know of an op: the dispatched op whose kernel runs it and how
    its arguments map onto that kernel's (``pick``; ``None`` = unchanged)."""

    name: str
    schema: str
    runs: str
    pick: Optional[Callable[[tuple], tuple]] = None


#: name -> definition, for every op of the namespace
DEFS: dict[str, OpDef] = {}


def define(
    schema: str,
    *,
    dispatch: Optional[_registry.DispatchKey] = None,
    fake: Callable,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
    kernel_of: Optional[tuple[str, Callable[[tuple], tuple]]] = None,
    check: Optional[Callable] = None,
):
    """Define ``supsup_fast::<name>`` from its schema and return its ``torch.ops`` packet.

    Exactly one of ``dispatch`` (a dispatched op: ``args -> (device type, dtype or None)``) and
    ``kernel_of`` (a carrier op) is given. ``backward`` / ``setup_context`` register its autograd.
    ``check(*args)`` validates the arguments (raising :class:`~supsup_fast.errors.SupsupError` naming
    the problem) before any backend sees them: called by the op itself, so ``torch.ops.supsup_fast.<name>``
    refuses what the public wrapper refuses (the wrapper calls it too, before the fast path).
    """
    if (dispatch is None) == (kernel_of is None):
        raise ValueError("define: give either dispatch= (a dispatched op) or kernel_of= (a carrier op)")
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    if dispatch is not None:
        _registry.declare(name, dispatch)
        DEFS[name] = OpDef(name, schema, name)

        def real(*args):
            if check is not None:
                check(*args)
            return _registry.run(name, *args)
    else:
        runs, pick = kernel_of
        DEFS[name] = OpDef(name, schema, runs, pick)

        def real(*args):
            if check is not None:
                check(*args)
            return _registry.run(runs, *pick(args))

    LIB.impl(name, real, "CompositeExplicitAutograd")
    torch.library.register_fake(f"supsup_fast::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"supsup_fast::{name}", backward, setup_context=setup_context, lib=LIB)
    return getattr(NAMESPACE, name)


# ---- dispatch keys shared by the op modules -----------------------------------------------------------
def device_type(t: torch.Tensor) -> str:
    """``t.device.type``; ``is_cpu`` first because building a ``torch.device`` costs ~0.3 us a call."""
    return "cpu" if t.is_cpu else t.device.type


def on_first(args: tuple) -> tuple:
    """Device and dtype of the first argument."""
    t = args[0]
    return device_type(t), t.dtype


def on_first_device(args: tuple) -> tuple:
    """Device of the first argument; any dtype (bit ops)."""
    return device_type(args[0]), None
