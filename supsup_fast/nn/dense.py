"""A dense module learned per task: a head or a norm whose weights each task trains and keeps for itself.

peft's ``modules_to_save``: :func:`~supsup_fast.convert_` leaves a module named in
``modules_to_save`` dense and wraps it in a :class:`TaskDense`. The wrapped module's floating
parameters are then task state, like a mask: the open task trains the live parameters (every new
task starts from the values the module had when it was converted), :meth:`freeze_task` stores a copy
of them as that task's row, and each mode of :mod:`supsup_fast.nn.base` applies them:

* ``"train"``: the live module;
* ``"task"``: the module called with task ``task_id``'s stored parameters (``torch.func.functional_call``);
* ``"superpose"``: with the ``alpha``-weighted mean of every task's parameters, ``sum_t a_t theta_t``
  (linear in ``alpha`` as ``W * sum_t a_t M_t`` is, so ``d loss / d alpha`` reaches it too);
* ``"rows"``: each row with its own task's parameters.

Per task it costs the module's parameter count in its dtype, in memory and in a bank.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..errors import SupsupError
from .base import TaskModule


class TaskDense(TaskModule):
    """``module`` with one stored copy of its floating parameters per task (buffers ``stack_<i>`` of ``[T, ...]``).

    Attributes:
        module: the live module; its parameters train while a task is open and are frozen otherwise.
        param_names: the qualified names of the parameters kept per task (``stack_<i>`` holds ``param_names[i]``).
    """

    def __init__(self, module: nn.Module, max_tasks: Optional[int] = None) -> None:
        params = [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
        if not params:
            raise SupsupError(f"TaskDense: {type(module).__name__} has no floating parameters to keep per task")
        device = params[0][1].device
        super().__init__(max_tasks, device)
        self.module = module
        self.param_names = [n for n, _ in params]
        for i, (_, p) in enumerate(params):
            p.requires_grad_(False)
            self.register_buffer(f"init_{i}", p.detach().clone())  # where every new task starts
            self.register_buffer(f"stack_{i}", p.detach().new_empty((0,) + tuple(p.shape)))
        # persistent, so a state dict taken mid-task reopens it on load as the masks' scores do
        self.register_buffer("is_open", torch.zeros((), dtype=torch.bool, device=device))

    # ---- task protocol ---------------------------------------------------------------------
    def _live(self) -> list[nn.Parameter]:
        return [self.module.get_parameter(n) for n in self.param_names]

    def _stacks(self) -> list[torch.Tensor]:
        return [getattr(self, f"stack_{i}") for i in range(len(self.param_names))]

    @property
    def num_tasks(self) -> int:
        return int(self.stack_0.shape[0])

    @property
    def in_training(self) -> bool:
        return bool(self.is_open)

    def _reference_tensor(self) -> torch.Tensor:
        return self.stack_0

    def live_parameters(self) -> list[nn.Parameter]:
        """The parameters the open task trains (empty when no task is open)."""
        return self._live() if self.in_training else []

    @torch.no_grad()
    def begin_task(self, task: Optional[int] = None) -> int:
        """Load the starting values (a new task) or task ``task``'s stored ones into the live module; unfreeze it."""
        t = self._task_to_open(task)
        reopened = t < self.num_tasks
        for i, p in enumerate(self._live()):
            p.copy_(self._stacks()[i][t] if reopened else getattr(self, f"init_{i}"))
            p.requires_grad_(True)
        self.is_open.fill_(True)
        self.mode, self.task_id, self.open_task = "train", t, t
        return t

    @torch.no_grad()
    def freeze_task(self) -> int:
        """Store the live parameters as task ``open_task``'s row and freeze them; returns its id."""
        self._check_freeze()
        t = self.open_task
        reopened = t < self.num_tasks
        for i, p in enumerate(self._live()):
            stack = getattr(self, f"stack_{i}")
            if reopened:
                stack[t] = p.detach()
            else:
                setattr(self, f"stack_{i}", torch.cat([stack, p.detach()[None].to(stack.dtype)]))
            p.requires_grad_(False)
        self.is_open.fill_(False)
        self.mode, self.task_id, self.open_task = "task", t, None
        return t

    def discard_task(self) -> None:
        self._check_freeze()
        for p in self._live():
            p.requires_grad_(False)
        self.is_open.fill_(False)
        self._after_discard()

    def delete_task(self, t: int) -> None:
        for i, stack in enumerate(self._stacks()):
            setattr(self, f"stack_{i}", torch.cat([stack[:t], stack[t + 1:]]))

    @torch.no_grad()
    def task_state(self, t: int) -> dict[str, torch.Tensor]:
        """Frozen task ``t``'s parameters by name."""
        return {n: s[t] for n, s in zip(self.param_names, self._stacks())}

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        mode = self.mode
        if mode == "train":
            if not self.in_training:
                raise SupsupError("TaskDense: no task selected: call begin_task() or set_task(t)")
            return self.module(*args, **kwargs)
        if mode == "task":
            state = {n: s.index_select(0, self.task_index).squeeze(0) for n, s in zip(self.param_names, self._stacks())}
            return functional_call(self.module, state, args, kwargs)
        if mode == "superpose":
            a = self.alpha
            state = {n: torch.tensordot(a.to(s.dtype), s, dims=1) for n, s in zip(self.param_names, self._stacks())}
            return functional_call(self.module, state, args, kwargs)
        # "rows": every row with its task's parameters, one call per task present
        x = args[0]
        ids = self._rows_of(x)
        out = None
        for t in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == t).flatten()
            y = functional_call(self.module, self.task_state(t), (x.index_select(0, rows),) + args[1:], kwargs)
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out

    # ---- state dict: the stacks follow the saved number of tasks -----------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for i, stack in enumerate(self._stacks()):
            saved = state_dict.get(f"{prefix}stack_{i}")
            if saved is not None:
                if tuple(saved.shape[1:]) != tuple(stack.shape[1:]):
                    raise SupsupError(f"TaskDense at '{prefix}': saved stack_{i} ({self.param_names[i]}) has shape "
                                      f"{tuple(saved.shape)}, expected [T, {', '.join(map(str, stack.shape[1:]))}]")
                setattr(self, f"stack_{i}", stack.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        counts = {s.shape[0] for s in self._stacks()}
        if len(counts) != 1:
            raise SupsupError(f"TaskDense at '{prefix}': the saved stacks hold different numbers of tasks {counts}")
        for p in self._live():
            p.requires_grad_(self.in_training)
        self._mode_after_load()

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, mode={self.mode!r}, task_id={self.task_id}, per_task={self.param_names}"
