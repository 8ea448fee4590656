"""The task protocol every SupSup layer follows: train one task, freeze it, select or mix tasks.

A layer is always in one of four modes:

* ``"train"`` -- the task being learned (``task_id``) uses its live state (scores, or running
  statistics being updated); only this state is trainable.
* ``"task"`` -- frozen task ``task_id`` is applied from stored state alone (mask bits, statistics).
* ``"superpose"`` -- all frozen tasks are mixed with weights ``alpha`` (a 1-D tensor of length
  ``num_tasks``, shared by every layer of a model and never copied, so ``d loss / d alpha``
  accumulates across layers).
* ``"rows"`` -- row ``i`` of the batch is computed with frozen task ``row_tasks[i]`` (a 1-D int64
  tensor shared by every layer): a batch that mixes tasks, as a continual-learning evaluation
  stream with task labels does, in one forward pass.

``begin_task()`` opens task ``num_tasks`` (or reopens a frozen task ``t`` with
``begin_task(t)``; its id is ``open_task`` until frozen), ``freeze_task()`` stores it and
returns its id, ``set_task(t)`` and ``set_superposition(alpha)`` select what ``forward``
computes; ``set_task(open_task)`` returns to the task in training. The mode lives in plain
attributes that ``forward`` only reads, so ``torch.compile`` specialises on it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import SupsupError

MODES = ("train", "task", "superpose", "rows")


class TaskModule(nn.Module):
    """Mode bookkeeping and validation shared by masked layers and per-task normalisation."""

    def __init__(self, max_tasks: Optional[int] = None, device=None) -> None:
        super().__init__()
        self.max_tasks = max_tasks
        self.mode = "train"
        # The selected task lives in a 1-element tensor that forward reads with index_select: one
        # compiled graph then serves every task id (an int would be specialised, one graph per task)
        # and CUDA never syncs on it. `task_id` is the int view of it, kept in step by its setter.
        self.register_buffer("task_index", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self._task_id = 0
        self.open_task: Optional[int] = None  # id of the task between begin_task and freeze_task
        # kept out of nn.Module's registries on purpose: alpha is owned by the caller, shared by
        # all layers, and must be neither a parameter of each layer nor part of the state dict
        self.__dict__["alpha"] = None
        self.__dict__["row_tasks"] = None

    @property
    def task_id(self) -> int:
        """The selected task (``"task"`` mode) or the one in training (``"train"`` mode)."""
        return self._task_id

    @task_id.setter
    def task_id(self, t: int) -> None:
        self._task_id = int(t)
        self.task_index.fill_(max(int(t), 0))

    # ---- what subclasses provide ----------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """Number of frozen (stored) tasks."""
        raise NotImplementedError

    @property
    def in_training(self) -> bool:
        """Whether a task is open (between ``begin_task`` and ``freeze_task``)."""
        raise NotImplementedError

    # ---- shared validation ----------------------------------------------------------
    def _task_to_open(self, task: Optional[int]) -> int:
        if self.in_training:
            raise SupsupError(
                f"{type(self).__name__}: task {self.open_task} is still in training; call freeze_task() "
                "before beginning another"
            )
        t = self.num_tasks if task is None else _as_task_id(task)
        if task is None:
            if self.max_tasks is not None and t >= self.max_tasks:
                raise SupsupError(
                    f"{type(self).__name__}: task budget exhausted: max_tasks={self.max_tasks} tasks are already stored"
                )
        elif not 0 <= t < self.num_tasks:
            raise SupsupError(
                f"{type(self).__name__}: cannot reopen task {t}: only tasks 0..{self.num_tasks - 1} are stored "
                f"(num_tasks={self.num_tasks})"
            )
        return t

    def _check_freeze(self) -> None:
        if not self.in_training:
            raise SupsupError(f"{type(self).__name__}: freeze_task() without begin_task(): no task is in training")

    def discard_task(self) -> None:
        """Drop the task in training without storing it (a reopened task keeps its stored state)."""
        raise NotImplementedError

    def _after_discard(self) -> None:
        if self.num_tasks:
            self.mode, self.task_id = "task", self.num_tasks - 1
        else:
            self.mode, self.task_id = "train", 0
        self.open_task = None

    # ---- selection -------------------------------------------------------------------
    def set_task(self, t: int) -> None:
        """Apply task ``t``: a frozen task (``0 <= t < num_tasks``) or the task in training."""
        t = _as_task_id(t)
        if self.in_training and t == self.open_task:
            self.mode = "train"
        elif 0 <= t < self.num_tasks:
            self.mode = "task"
        elif self.num_tasks == 0:
            live = f"; task {self.open_task} is in training" if self.in_training else ""
            raise SupsupError(f"{type(self).__name__}: task id {t}: no task is stored yet{live} "
                              "(learn one with begin_task / freeze_task, or load a bank)")
        else:
            live = f" (task {self.open_task} is in training)" if self.in_training else ""
            raise SupsupError(
                f"{type(self).__name__}: task id {t} out of range: num_tasks={self.num_tasks}, "
                f"valid ids are 0..{self.num_tasks - 1}{live}"
            )
        self.task_id = t

    def set_superposition(self, alpha: torch.Tensor) -> None:
        """Mix all frozen tasks with weights ``alpha`` ([num_tasks] float); the tensor is stored, not copied."""
        if self.num_tasks == 0:
            raise SupsupError(f"{type(self).__name__}: set_superposition needs at least one frozen task, num_tasks=0")
        if not isinstance(alpha, torch.Tensor):
            raise SupsupError(f"alpha must be a 1-D float tensor, got {type(alpha).__name__}")
        if alpha.dim() != 1 or alpha.shape[0] != self.num_tasks:
            raise SupsupError(
                f"{type(self).__name__}: alpha has shape {tuple(alpha.shape)}, expected [{self.num_tasks}] "
                f"(one weight per frozen task, num_tasks={self.num_tasks})"
            )
        if not alpha.is_floating_point():
            raise SupsupError(f"alpha must be a floating tensor, got {alpha.dtype}")
        ref = self._reference_tensor()
        if ref is not None and alpha.device != ref.device:
            raise SupsupError(f"alpha is on {alpha.device} but the layer is on {ref.device}")
        self.__dict__["alpha"] = alpha
        self.mode = "superpose"

    def set_row_tasks(self, task_ids: torch.Tensor) -> None:
        """Compute row ``i`` of the next batches with frozen task ``task_ids[i]`` (int64 ``[B]``; stored, not
        copied)."""
        if (not isinstance(task_ids, torch.Tensor) or task_ids.dim() != 1 or task_ids.is_floating_point()
                or task_ids.dtype == torch.bool):
            got = getattr(task_ids, "shape", task_ids)
            raise SupsupError(f"row task ids must be a 1-D integer tensor, got {got!r}")
        if task_ids.numel() and self.num_tasks == 0:
            raise SupsupError(f"{type(self).__name__}: row task ids given but no task is stored yet")
        ref = self._reference_tensor()
        if ref is not None and task_ids.device != ref.device:
            raise SupsupError(f"row task ids are on {task_ids.device} but the layer is on {ref.device}")
        self.__dict__["row_tasks"] = task_ids
        self.mode = "rows"

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.row_tasks
        if x.dim() < 1 or x.shape[0] != ids.shape[0]:
            raise SupsupError(f"{type(self).__name__}: {ids.shape[0]} row task ids for an input of shape "
                              f"{tuple(x.shape)}; set_row_tasks needs one id per row of the batch")
        return ids

    def _reference_tensor(self) -> Optional[torch.Tensor]:
        return None

    def _mode_after_load(self) -> None:
        """After a state dict is loaded: train the open task if any, else apply the last frozen one."""
        if self.in_training:  # a checkpoint taken mid-task resumes that state as the next new task
            self.mode, self.task_id = "train", self.num_tasks
            self.open_task = self.task_id
        elif self.num_tasks:
            self.mode, self.task_id = "task", self.num_tasks - 1
            self.open_task = None
        else:
            self.mode, self.task_id = "train", 0
            self.open_task = None
        self.__dict__["alpha"] = None
        self.__dict__["row_tasks"] = None


def _as_task_id(t) -> int:
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point() and t.dtype != torch.bool:
        return int(t.item())
    if isinstance(t, bool) or not isinstance(t, int):
        raise SupsupError(f"task id must be an int, got {t!r}")
    return int(t)
