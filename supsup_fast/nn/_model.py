"""A model's SupSup modules, seen from outside: which they are, where they live, and their modes.

One copy of each question the rest of the library asks about a converted model.
"""

from __future__ import annotations

import contextlib

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
    """Restore every task module's mode, task id and alpha on exit."""
    mods = task_modules(model)
    saved = [(m.mode, m.task_id, m.__dict__.get("alpha")) for m in mods]
    try:
        yield
    finally:
        for m, (mode, task_id, alpha) in zip(mods, saved):
            m.mode, m.task_id = mode, task_id
            m.__dict__["alpha"] = alpha
