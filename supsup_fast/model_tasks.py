"""Driving every SupSup module of a model at once: begin, freeze, select, name and delete tasks.

The helpers apply the task protocol (:mod:`supsup_fast.nn.base`) to every task module of a model
and check that all of them agree on the number of tasks. A task is addressed by its id (``0 ..
num_tasks - 1``, in the order tasks were frozen) or, once named, by its name; names live in the
model's :class:`~supsup_fast.nn.record.ModelRecord` and in its banks.

The training protocol is guarded: :func:`task_parameters` raises when no task is open, a bank is
never saved with a task open, and an optimizer that still holds a frozen task's scores raises at its
next ``step()`` instead of silently training nothing (each task needs an optimizer over its own
scores; :func:`task` gives them). :func:`recalibrate_norms` re-estimates a task's BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import SupsupError
from .nn import TaskBatchNorm, TaskDense
from .nn._model import masked_modules, model_device, named_task_modules, refuse_if_in_use, task_modules
from .nn.base import TaskModule, _as_task_id
from .nn.record import record_of

TaskRef = Union[int, str]


# ---------------------------------------------------------------------------------------------
# The task modules and their agreement
# ---------------------------------------------------------------------------------------------
def _layers(model: nn.Module, changing: str = "") -> list[TaskModule]:
    if changing:  # a mode change under another thread's inference would change that thread's result
        refuse_if_in_use(model, changing)
    layers = task_modules(model)
    if not layers:
        raise SupsupError(f"{type(model).__name__} has no SupSup layers; convert it with convert_(model, config)")
    return layers


def num_tasks(model: nn.Module) -> int:
    """The number of frozen tasks, which every SupSup layer of ``model`` must agree on."""
    layers = _layers(model)
    counts = {m.num_tasks for m in layers}
    if len(counts) != 1:
        names = {id(m): n for n, m in model.named_modules()}
        detail = ", ".join(f"{names.get(id(m), '?')}={m.num_tasks}" for m in layers)
        raise SupsupError(f"SupSup layers disagree on the number of frozen tasks: {detail}")
    return counts.pop()


def _same(ids: list[int], what: str) -> int:
    if len(set(ids)) != 1:
        raise SupsupError(f"{what}: layers returned different task ids {sorted(set(ids))}")
    return ids[0]


def _open_task(layers) -> Optional[int]:
    open_ = {m.open_task for m in layers if m.in_training}
    return next(iter(open_)) if len(open_) == 1 else None


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def tasks(model: nn.Module) -> list[Optional[str]]:
    """The name of every frozen task, by id (``None`` for an unnamed task)."""
    count = num_tasks(model)
    return list(record_of(model).names(count))


def task_id(model: nn.Module, task: TaskRef) -> int:
    """The id of frozen task ``task`` (an id or a name); a :class:`SupsupError` naming the known tasks if absent."""
    count = num_tasks(model)
    names = record_of(model).names(count)
    if isinstance(task, str):
        if task not in names:
            known = [n for n in names if n is not None]
            raise SupsupError(f"the model has no task named {task!r}; its named tasks are {known} "
                              f"({count} tasks in all)")
        return names.index(task)
    t = _as_task_id(task)
    if not 0 <= t < count:
        if count == 0:
            raise SupsupError(f"task {t}: the model has no frozen task yet (begin_task / freeze_task first)")
        raise SupsupError(f"task id {t} out of range: the model holds tasks 0..{count - 1}")
    return t


def _check_new_name(model: nn.Module, name, count: int) -> None:
    if name is None:
        return
    if not isinstance(name, str) or not name:
        raise SupsupError(f"a task name must be a non-empty str, got {name!r}")
    if name in record_of(model).names(count):
        raise SupsupError(f"the model already has a task named {name!r} (id "
                          f"{record_of(model).task_names.index(name)}); names are unique")


def rename_task(model: nn.Module, task: TaskRef, name: Optional[str]) -> None:
    """Give frozen task ``task`` the name ``name`` (``None`` removes its name)."""
    t = task_id(model, task)
    rec = record_of(model)
    if name is not None and rec.task_names[t] != name:
        _check_new_name(model, name, num_tasks(model))
    rec.task_names[t] = name


# ---------------------------------------------------------------------------------------------
# Beginning, freezing, discarding, deleting
# ---------------------------------------------------------------------------------------------
def begin_task(model: nn.Module, task: Optional[TaskRef] = None, *, name: Optional[str] = None) -> int:
    """Open a new task (``task=None``, optionally called ``name``) or reopen frozen task ``task`` (an id or a
    name) in every layer; returns its id. Nothing but the task's scores (and its ``modules_to_save``) trains."""
    layers = _layers(model, "begin_task")
    count = num_tasks(model)
    if any(m.in_training for m in layers):
        raise SupsupError("begin_task: a task is still in training; call freeze_task(model) (or discard_task) first")
    rec = record_of(model)
    if task is None:
        _check_new_name(model, name, count)
        t = None
    else:
        t = task_id(model, task)
        if name is not None and name != rec.names(count)[t]:
            raise SupsupError(f"begin_task: task {t} is called {rec.task_names[t]!r}; reopen it by id or name and "
                              "rename it with rename_task")
        name = rec.names(count)[t]
    opened = _same([m.begin_task(t) for m in layers], "begin_task")
    rec.open_name = name
    return opened


def freeze_task(model: nn.Module) -> int:
    """Store the task in training in every layer (bits, statistics, per-task modules); returns its id."""
    layers = _layers(model, "freeze_task")
    missing = [n for n, m in named_task_modules(model) if not m.in_training]
    if missing:
        raise SupsupError(f"freeze_task without begin_task: no task is in training in {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
    trained = _scores(model)
    frozen = _same([m.freeze_task() for m in layers], "freeze_task")
    rec = record_of(model)
    names = rec.names(num_tasks(model))
    names[frozen] = rec.open_name
    rec.open_name = None
    _retire(trained, frozen, names[frozen])
    return frozen


def discard_task(model: nn.Module) -> None:
    """Drop the task in training without storing it; a reopened task keeps what it had stored."""
    layers = _layers(model, "discard_task")
    if not any(m.in_training for m in layers):
        raise SupsupError("discard_task: no task is in training")
    trained = _scores(model)
    for m in layers:
        if m.in_training:
            m.discard_task()
    record_of(model).open_name = None
    _retire(trained, None, None)


def delete_task(model: nn.Module, task: TaskRef) -> None:
    """Remove frozen task ``task`` from every layer; the tasks after it move down one id (their names stay)."""
    layers = _layers(model, "delete_task")
    if any(m.in_training for m in layers):
        raise SupsupError("delete_task: a task is in training; freeze_task or discard_task first")
    t = task_id(model, task)
    for m in layers:
        m.delete_task(t)
        m._mode_after_load()
    del record_of(model).task_names[t]


@contextlib.contextmanager
def task(model: nn.Module, task: Optional[TaskRef] = None, *, name: Optional[str] = None) -> Iterator[list]:
    """``with sf.task(model, name="digits") as params:`` begins a task (or reopens ``task``), yields the
    parameters to train (give them to a new optimizer) and freezes the task on exit. If the block raises, the
    task is discarded (a reopened task keeps its stored state) and the exception goes on."""
    begin_task(model, task, name=name)
    try:
        yield task_parameters(model)
    except BaseException:
        discard_task(model)
        raise
    freeze_task(model)


# ---------------------------------------------------------------------------------------------
# Selecting
# ---------------------------------------------------------------------------------------------
def set_task(model: nn.Module, t: TaskRef) -> None:
    """Apply task ``t`` (an id or a name) everywhere: a frozen task, or the one in training."""
    layers = _layers(model, "set_task")
    count = num_tasks(model)
    if isinstance(t, str):
        rec = record_of(model)
        if rec.open_name == t and _open_task(layers) is not None:
            t = _open_task(layers)
        else:
            t = task_id(model, t)
    elif count == 0 and _open_task(layers) is None:
        raise SupsupError(f"set_task({t}): the model has no task yet; learn one (begin_task / freeze_task) or load "
                          "a bank")
    for m in layers:
        m.set_task(t)


def set_row_tasks(model: nn.Module, task_ids: Union[torch.Tensor, Sequence[TaskRef]]) -> torch.Tensor:
    """Compute row ``i`` of every following batch with frozen task ``task_ids[i]`` (ids or names), in one forward
    pass: a batch mixing tasks. Returns the int64 id tensor every layer shares. Leave with ``set_task``."""
    layers = _layers(model, "set_row_tasks")
    count = num_tasks(model)
    device = model_device(model)
    if isinstance(task_ids, torch.Tensor):
        ids = task_ids.to(device=device, dtype=torch.int64)
    else:
        ids = torch.tensor([task_id(model, t) for t in task_ids], dtype=torch.int64, device=device)
    if ids.dim() != 1:
        raise SupsupError(f"set_row_tasks: task_ids must be 1-D (one task per row), got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count):
        raise SupsupError(f"set_row_tasks: task ids must be frozen tasks 0..{count - 1}, got min {int(ids.min())}, "
                          f"max {int(ids.max())}")
    for m in layers:
        m.set_row_tasks(ids)
    return ids


def set_superposition(model: nn.Module, alpha: Optional[torch.Tensor] = None,
                      requires_grad: bool = False) -> torch.Tensor:
    """Mix all frozen tasks with ``alpha`` in every layer; returns the (shared) alpha tensor.

    ``alpha=None`` means uniform ``1/T`` over the ``T`` learned tasks (float32, on the model's
    device). With ``requires_grad=True`` the returned alpha is a leaf requiring grad, so one
    backward pass yields ``d loss / d alpha`` summed over every layer.
    """
    layers = _layers(model, "set_superposition")
    t = num_tasks(model)
    if t == 0:
        raise SupsupError("set_superposition: the model has no frozen tasks to superpose")
    if alpha is None:
        device = next((b.device for m in layers for b in m.buffers()), torch.device("cpu"))
        alpha = torch.full((t,), 1.0 / t, dtype=torch.float32, device=device)
    if requires_grad and not alpha.requires_grad:
        if not alpha.is_leaf:
            raise SupsupError("set_superposition(requires_grad=True): alpha is not a leaf tensor; pass a leaf")
        alpha.requires_grad_(True)
    for m in layers:
        m.set_superposition(alpha)
    return alpha


# ---------------------------------------------------------------------------------------------
# What trains, and the optimizers that must not train a frozen task
# ---------------------------------------------------------------------------------------------
def _scores(model: nn.Module) -> list[nn.Parameter]:
    """The open task's scores: parameters that live only until the task is frozen (a per-task module's live
    parameters stay and serve the next task too)."""
    return [m.scores for m in masked_modules(model) if m.scores is not None]


def _live_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = _scores(model)
    for m in task_modules(model):
        if isinstance(m, TaskDense):
            params.extend(m.live_parameters())
    return params


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the task in training, the ones to give an optimizer: every masked layer's scores and
    the live parameters of the ``modules_to_save``. Raises when no task is open."""
    layers = _layers(model)
    if not any(m.in_training for m in layers):
        raise SupsupError("task_parameters: no task is in training, so nothing is to be trained; call "
                          "begin_task(model) (or use `with sf.task(model) as params:`) first")
    return _live_parameters(model)


# id(parameter) -> (weak reference, task id, task name) of every parameter a frozen or discarded task trained
_RETIRED: dict[int, tuple] = {}
_STEP_HOOK = None


def _retire(params: list, t: Optional[int], name: Optional[str]) -> None:
    global _STEP_HOOK
    for p in params:
        key = id(p)
        _RETIRED[key] = (weakref.ref(p, lambda _, key=key: _RETIRED.pop(key, None)), t, name)
    if params and _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_refuse_retired_parameters)


def _refuse_retired_parameters(optimizer, args, kwargs):
    """Before every optimizer step: refuse one that still trains a task frozen by ``freeze_task``."""
    if not _RETIRED:
        return None
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _RETIRED.get(id(p))
            if entry is not None and entry[0]() is p:
                what = "a discarded task" if entry[1] is None else \
                    f"task {entry[1]}" + (f" ({entry[2]!r})" if entry[2] else "")
                raise SupsupError(
                    f"{type(optimizer).__name__}.step(): this optimizer holds the scores of {what}, which "
                    "freeze_task stored and released; stepping it would train nothing. Make a new optimizer for "
                    "each task over sf.task_parameters(model) (or use `with sf.task(model) as params:`)")
    return None


def mask_nbytes(model: nn.Module) -> int:
    """Bytes of stored mask bits over all masked layers (``sum T * N * ceil(K/32) * 4``)."""
    return sum(m.mask_nbytes() for m in masked_modules(model))


# ---------------------------------------------------------------------------------------------
# Norm statistics
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_norms(model: nn.Module, task: TaskRef, batches: Iterable) -> int:
    """Re-estimate frozen task ``task``'s BatchNorm statistics from ``batches`` (inputs, or tuples whose first item
    is the input), with its masks applied: the exact mean over the batches, as ``torch.optim.swa_utils.update_bn``
    computes it (the model runs in ``train()`` mode). Returns the number of batches seen; masks are untouched."""
    layers = _layers(model)
    if any(m.in_training for m in layers):
        raise SupsupError("recalibrate_norms: a task is in training; freeze_task first")
    t = task_id(model, task)
    norms = [m for m in layers if isinstance(m, TaskBatchNorm)]
    if not norms:
        raise SupsupError("recalibrate_norms: the model has no per-task BatchNorm")
    device = model_device(model)
    was_training = model.training
    momenta = [m.momentum for m in norms]
    seen = 0
    for m in layers:
        if isinstance(m, TaskBatchNorm):
            m.begin_task(t)
            m.task_mean.zero_()
            m.task_var.fill_(1.0)
        else:
            m.set_task(t)
    try:
        model.train()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for m in norms:
                m.momentum = 1.0 / (seen + 1)  # cumulative mean: batch i weighs 1/(i+1)
            model(x.to(device))
            seen += 1
        if seen == 0:
            raise SupsupError("recalibrate_norms: batches yielded nothing")
    except BaseException:
        for m in norms:
            m.discard_task()
        raise
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was_training)
    for m in norms:
        m.freeze_task()
    set_task(model, t)
    return seen
