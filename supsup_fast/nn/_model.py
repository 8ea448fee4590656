"""A model's SupSup modules, seen from outside: which they are, where they live, and their modes.

One copy of each question the rest of the library asks about a converted model.

Threads: a model's mode (task, superposition, alpha) is state of its modules, so two threads that
set it at once would run each other's task. :func:`model_in_use` serialises the library's calls
on one model (task inference, classification): each thread's call runs alone and gets its own
result. While a thread is inside such a call, another thread's mode change
(:func:`refuse_if_in_use`) or forward through the model's task modules raises
:class:`~supsup_fast.errors.SupsupError` instead of silently using or changing the other's mode.
Threads that both drive one model by hand (``convert.set_task`` then ``model(x)``), with no library
call between them, are not detected: use ``inference.task_logits`` / ``classify`` (a task per row)
from threads, or one model per thread.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import nn

from ..errors import SupsupError
from .base import TaskModule
from .masked import MaskedLayerBase


def named_task_modules(model: nn.Module) -> list[tuple[str, TaskModule]]:
    """``(qualified name, module)`` of every task module (masked layers and per-task norms), in module
    order, each once (a module held twice is listed under its first name)."""
    if not isinstance(model, nn.Module):
        raise SupsupError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TaskModule)]


def task_modules(model: nn.Module) -> list[TaskModule]:
    """Every task module of ``model`` (masked layers and per-task norms), in module order."""
    return [m for _, m in named_task_modules(model)]


def masked_modules(model: nn.Module) -> list[MaskedLayerBase]:
    """The masked layers of ``model`` only (no norms), in module order."""
    return [m for m in task_modules(model) if isinstance(m, MaskedLayerBase)]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's masked layers."""
    for m in masked_modules(model):
        return m.bank.device  # not m.weight: a lazy base would be regenerated for it
    raise SupsupError(f"{type(model).__name__} has no masked layers; convert it with convert_(model, config)")


@contextlib.contextmanager
def preserved_mode(model: nn.Module):
    """Restore every task module's mode, task id, alpha and row task ids on exit."""
    mods = task_modules(model)
    saved = [(m.mode, m.task_id, m.__dict__.get("alpha"), m.__dict__.get("row_tasks")) for m in mods]
    try:
        yield
    finally:
        for m, (mode, task_id, alpha, rows) in zip(mods, saved):
            if m.mode != mode:  # nn.Module's __setattr__ is slow: set what changed
                m.mode = mode
            if m.task_id != task_id:
                m.task_id = task_id
            m.__dict__["alpha"] = alpha
            m.__dict__["row_tasks"] = rows


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module in ``eval()`` (so no batch statistics couple rows or update running statistics, no
    dropout), each module's own ``training`` flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    if any(flag for _, flag in flags):  # already all in eval: nothing to switch (task inference's common case)
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag


class _Guard:
    """One model's lock and the thread holding it (re-entrant: a call may call another)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.owner: int | None = None
        self.depth = 0
        self.hooks: list = []


_GUARDS: "weakref.WeakKeyDictionary[nn.Module, _Guard]" = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def _guard(model: nn.Module) -> _Guard:
    with _GUARDS_LOCK:
        g = _GUARDS.get(model)
        if g is None:
            g = _GUARDS[model] = _Guard()
        return g


def _in_use_error(model: nn.Module, what: str) -> SupsupError:
    return SupsupError(
        f"{what}: this {type(model).__name__} is in use by another thread (task inference or classification "
        "switches its mode); a model's mode is shared state, so changing it or running it from two threads "
        "at once would give one thread the other's task. Use inference.task_logits / classify / infer_task "
        "(they take turns on a shared model) or give each thread its own model"
    )


@contextlib.contextmanager
def model_in_use(model: nn.Module):
    """Hold ``model`` for the calling thread: other threads' library calls on it wait, their mode changes
    and forwards through its task modules raise."""
    g = _guard(model)
    g.lock.acquire()
    try:
        if g.depth == 0:
            g.owner = threading.get_ident()
            mine = g.owner

            def foreign_forward(module, args):
                # a compiled graph is not checked: it cannot ask which thread runs it
                if not torch.compiler.is_compiling() and threading.get_ident() != mine:
                    raise _in_use_error(model, f"{type(module).__name__}.forward")

            g.hooks = [m.register_forward_pre_hook(foreign_forward) for m in task_modules(model)]
        g.depth += 1
        try:
            yield
        finally:
            g.depth -= 1
            if g.depth == 0:
                for h in g.hooks:
                    h.remove()
                g.hooks, g.owner = [], None
    finally:
        g.lock.release()


def refuse_if_in_use(model: nn.Module, what: str) -> None:
    """Raise if a thread other than the caller holds ``model`` (see :func:`model_in_use`)."""
    g = _GUARDS.get(model)
    if g is not None and g.owner is not None and g.owner != threading.get_ident():
        raise _in_use_error(model, what)
