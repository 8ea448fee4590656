"""The backend registry: which kernel runs an op on given inputs, and why the others do not.

A :class:`Backend` is a table ``op name -> kernel`` for some devices and dtypes, with optional
per-op checks that may decline particular inputs (and say why). :func:`choose` takes the
highest-priority backend that implements the op for the inputs' device and dtype and whose check
(if any) accepts them; a forced backend (:func:`force_backend`, or ``SUPSUP_FAST_BACKEND``) is the
only candidate, and its refusal is a :class:`~supsup_fast.errors.BackendError` with the reason.

Ops are declared by the op modules (:func:`declare`), each with how its device and dtype are read
from its arguments; backends are registered by :func:`supsup_fast.backends.register_all`.
This module imports nothing of the package but its errors.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import BackendError

ENV_BACKEND = "SUPSUP_FAST_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: ``args -> (device type, dtype or None)``: what an op dispatches on.
DispatchKey = Callable[[tuple], tuple]
#: ``check(*args) -> reason or None``: called with the op's own (named) arguments.
Check = Callable[..., Optional[str]]

_DISPATCH: dict[str, DispatchKey] = {}  # every declared op, in declaration order


def declare(op: str, dispatch: DispatchKey) -> None:
    """Declare a dispatched op and how its device and dtype are read from its arguments."""
    _DISPATCH[op] = dispatch
    _clear_choice_caches()


def op_names() -> tuple[str, ...]:
    """Every dispatched op, in declaration order."""
    return tuple(_DISPATCH)


def dispatch_key(op: str, args: tuple) -> tuple:
    """``(device type, dtype or None)`` of a call of ``op``."""
    return _DISPATCH[op](args)


@dataclass
class Backend:
    """A set of kernels for some devices and dtypes.

    Attributes:
        impls: ``op -> kernel``, called with the op's arguments.
        dtypes: the dtypes served (an op whose dtype is ``None`` -- bit ops -- always passes).
        op_dtypes: per-op overrides of ``dtypes``.
        checks: ``op -> check``; a check gets the op's arguments and returns why these inputs are
            declined (``None`` to accept). Ops without a check are decided on device and dtype alone,
            once, and their choice is cached.
        eager: ``op -> (device type, dtype, entry)``: a native entry that runs a plain eager call of
            ``op`` (the op's own arguments) on this backend's kernel for that device and dtype in one
            call, checking the arguments itself, and returns ``None`` for any call it does not serve
            (see :func:`eager_entry`).
    """

    name: str
    priority: int
    devices: tuple[str, ...]
    impls: dict[str, Callable] = field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    op_dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    eager: dict[str, tuple[str, torch.dtype, Callable]] = field(default_factory=dict)
    available: bool = True
    why_unavailable: str = ""

    def static_decline(self, op: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        """Why this backend cannot run ``op`` on this device and dtype whatever the inputs, or ``None``."""
        if not self.available:
            return f"{self.name} is unavailable: {self.why_unavailable}"
        if op not in self.impls:
            return f"{self.name} does not implement {op}"
        if device_type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)} tensors, not {device_type}"
        if dtype is not None and dtype not in self.op_dtypes.get(op, self.dtypes):
            return f"{self.name} does not support dtype {dtype} for {op}"
        return None

    def decline(self, op: str, args: tuple) -> Optional[str]:
        """Why this backend declines these inputs of ``op``, or ``None``."""
        why = self.static_decline(op, *dispatch_key(op, args))
        check = self.checks.get(op)
        if why is None and check is not None:
            why = check(*args)
        return why


_BACKENDS: dict[str, Backend] = {}
_CANDIDATES: dict[tuple, list[Backend]] = {}  # (op, device, dtype, forced name) -> backends passing static checks
_KERNELS: dict[tuple, Callable] = {}  # (op, device, dtype, SUPSUP_FAST_BACKEND) -> kernel, when no check can decline
_EAGER: dict[tuple, Optional[Callable]] = {}  # (op, SUPSUP_FAST_BACKEND) -> eager entry, or None
_forced_override: Optional[dict[str, str]] = None

# ``os.environ.get`` of an unset variable costs ~0.7 us (a KeyError raised and caught inside
# ``os._Environ``), more than a small kernel's dispatch; the mapping's own dict answers the same
# question in ~0.05 us and sees every change made through ``os.environ``.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_BACKEND) if hasattr(os.environ, "encodekey") else ENV_BACKEND


def _env_backend_raw():
    """``SUPSUP_FAST_BACKEND`` as stored (``None`` when unset): a cache key, read on every call."""
    if _ENV_DATA is None:
        return os.environ.get(ENV_BACKEND)
    return _ENV_DATA.get(_ENV_KEY)


def _clear_choice_caches() -> None:
    _CANDIDATES.clear()
    _KERNELS.clear()
    _EAGER.clear()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; higher ``priority`` is tried first."""
    unknown = sorted(set(backend.impls) - set(_DISPATCH))
    if unknown:
        raise BackendError(f"backend {backend.name!r} implements undeclared ops {unknown}")
    _BACKENDS[backend.name] = backend
    _clear_choice_caches()


def backends() -> list[Backend]:
    """Every registered backend, highest priority first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def _parse_forced(text: str) -> dict[str, str]:
    forced: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, name = part.rpartition("=")
        forced[op or "*"] = name
    return forced


_NOTHING_FORCED: dict[str, str] = {}


@functools.lru_cache(maxsize=8)
def _parse_forced_cached(text: str) -> dict[str, str]:
    return _parse_forced(text)


def forced_backends() -> dict[str, str]:
    """``{op or '*': backend}`` from :func:`force_backend` or ``SUPSUP_FAST_BACKEND``."""
    if _forced_override is not None:
        return _forced_override
    if _env_backend_raw() is None:
        return _NOTHING_FORCED
    return _parse_forced_cached(os.environ.get(ENV_BACKEND, ""))


@contextlib.contextmanager
def force_backend(spec: Optional[str]):
    """Force a backend for the duration of a ``with`` block (``None`` = automatic choice).

    ``spec`` has the same syntax as ``SUPSUP_FAST_BACKEND``: ``"reference"`` (every op) or
    ``"mask_dots=cpu_ext,superpose=reference"`` (per op). Not thread-local: it applies to every thread.
    """
    global _forced_override
    saved = _forced_override
    _forced_override = _parse_forced(spec or "")
    _clear_choice_caches()
    try:
        yield
    finally:
        _forced_override = saved
        _clear_choice_caches()


def _candidates(op: str, device_type: str, dtype: Optional[torch.dtype]) -> list[Backend]:
    forced = forced_backends()
    name = forced.get(op, forced.get("*"))
    key = (op, device_type, dtype, name)
    found = _CANDIDATES.get(key)
    if found is not None:
        return found
    if name is not None:
        if name not in _BACKENDS:
            raise BackendError(f"{ENV_BACKEND} names unknown backend {name!r}; known: {sorted(_BACKENDS)}")
        b = _BACKENDS[name]
        why = b.static_decline(op, device_type, dtype)
        if why is not None:
            raise BackendError(f"forced backend {name!r} cannot run {op} on {device_type}/{dtype}: {why}")
        found = [b]
    else:
        found = [b for b in backends() if b.static_decline(op, device_type, dtype) is None]
    _CANDIDATES[key] = found
    return found


def choose(op: str, device_type: str, dtype: Optional[torch.dtype], args: tuple = ()) -> Backend:
    """The backend that runs ``op`` on these inputs, or a :class:`BackendError` listing every reason.

    With ``args=()`` per-input checks are not consulted (what :mod:`supsup_fast.info` shows).
    """
    if op not in _DISPATCH:
        raise BackendError(f"unknown op {op!r}; declared ops: {list(_DISPATCH)}")
    cands = _candidates(op, device_type, dtype)
    reasons = []
    for b in cands:
        check = b.checks.get(op) if args else None
        why = check(*args) if check is not None else None
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    if not reasons:
        reasons = [f"{b.name}: {b.static_decline(op, device_type, dtype)}" for b in backends()]
    prefix = "forced backend declined" if forced_backends() else "no backend accepts"
    raise BackendError(f"{prefix} {op} on {device_type}/{dtype}: " + "; ".join(reasons))


def kernel(op: str, args: tuple) -> Callable:
    """The kernel :func:`choose` picks for ``op(*args)``; cached when no per-input check can decline.

    The cache is keyed on the environment's forced backend too, so changing ``SUPSUP_FAST_BACKEND``
    takes effect at once (:func:`force_backend` and :func:`register_backend` clear it).
    """
    device_type, dtype = _DISPATCH[op](args)
    key = (op, device_type, dtype, _env_backend_raw())
    impl = _KERNELS.get(key)
    if impl is not None:
        return impl
    cands = _candidates(op, device_type, dtype)
    if cands and op not in cands[0].checks:
        impl = _KERNELS[key] = cands[0].impls[op]
        return impl
    return choose(op, device_type, dtype, args).impls[op]


def eager_entry(op: str) -> Optional[Callable]:
    """The eager entry (:attr:`Backend.eager`) of the backend that the registry picks for ``op`` on
    the entry's device and dtype, or ``None``: no backend has one, it is not the one picked there
    (a forced backend, a higher-priority one), or a per-input check could decline its inputs.

    Calls the entry declines (other devices, dtypes, tensors with autograd to record...) go the
    usual way, so an entry changes no choice of the registry: it skips its Python only.
    """
    key = (op, _env_backend_raw())
    try:
        return _EAGER[key]
    except KeyError:
        pass
    entry = None
    for b in backends():
        if op in b.eager:
            device_type, dtype, fn = b.eager[op]
            try:
                cands = _candidates(op, device_type, dtype)
            except BackendError:
                cands = []
            if cands and cands[0] is b and op not in b.checks:
                entry = fn
            break
    _EAGER[key] = entry
    return entry


def run(op: str, *args):
    """Run ``op`` on the kernel the registry picks for these arguments."""
    return kernel(op, args)(*args)
