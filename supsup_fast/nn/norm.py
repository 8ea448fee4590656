"""Per-task batch normalisation: one set of running statistics per task, no trainable affine.

SupSup's GG networks must keep BatchNorm statistics per task: each mask selects a different
subnetwork with different activation statistics, and shared statistics leave every task but the
last at chance accuracy. :class:`TaskBatchNorm` follows the task protocol of
:mod:`supsup_fast.nn.base`:

* ``"train"``: in ``train()`` mode, batch statistics normalise and update only the open task's
  running statistics (``task_mean`` / ``task_var``); in ``eval()`` mode they are used as stored.
* ``"task"``: frozen task ``t``'s statistics, never updated (a frozen task stays frozen,
  whatever the module's ``training`` flag).
* ``"superpose"``: the statistics of the ``alpha``-weighted mixture of the tasks' activation
  distributions, ``mean = sum_t a_t mu_t`` and ``var = sum_t a_t (var_t + mu_t^2) - mean^2``
  (clamped at 0). ``alpha`` is used as given (weights summing to 1 make this an exact
  mixture), and both moments depend on it, so ``d loss / d alpha`` includes the statistics' part.

* ``"rows"``: row ``i`` normalised with frozen task ``row_tasks[i]``'s statistics.

Works on ``[B, C]``, ``[B, C, L]``, ``[B, C, H, W]`` and ``[B, C, D, H, W]`` inputs.
A pretrained BatchNorm's affine ``weight`` / ``bias`` may be kept, frozen, as buffers, and its
running statistics too (``init_mean`` / ``init_var``): every new task's statistics then start
from them, so a task that has not been trained yet normalises exactly as the pretrained layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SupsupError
from .base import TaskModule


class TaskBatchNorm(TaskModule):
    """BatchNorm with running statistics per task (buffers ``running_mean`` / ``running_var`` of ``[T, C]``)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        track_running_stats: bool = True,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        max_tasks: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        init_mean: Optional[torch.Tensor] = None,
        init_var: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__(max_tasks, device)
        if int(num_features) <= 0:
            raise SupsupError(f"TaskBatchNorm: num_features must be positive, got {num_features}")
        if momentum is None or not (0.0 <= float(momentum) <= 1.0):
            raise SupsupError(f"TaskBatchNorm: momentum must be a float in [0, 1] (cumulative averaging, "
                              f"momentum=None, is not supported), got {momentum!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.track_running_stats = bool(track_running_stats)
        dtype = torch.float32 if dtype is None else dtype
        c = self.num_features
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None:
                if tuple(value.shape) != (c,):
                    raise SupsupError(f"TaskBatchNorm: {name} has shape {tuple(value.shape)}, expected ({c},)")
                value = value.detach().clone()
            self.register_buffer(name, value)
        if (init_mean is None) != (init_var is None):
            raise SupsupError("TaskBatchNorm: give both init_mean and init_var, or neither")
        for name, value in (("init_mean", init_mean), ("init_var", init_var)):
            if value is not None:
                if tuple(value.shape) != (c,):
                    raise SupsupError(f"TaskBatchNorm: {name} has shape {tuple(value.shape)}, expected ({c},)")
                value = value.detach().clone().to(dtype)
            self.register_buffer(name, value)
        self.register_buffer("running_mean", torch.zeros(0, c, dtype=dtype, device=device))
        self.register_buffer("running_var", torch.ones(0, c, dtype=dtype, device=device))
        # the open task's statistics; allocated by begin_task, folded into the rows by freeze_task
        self.register_buffer("task_mean", None)
        self.register_buffer("task_var", None)

    @classmethod
    def from_module(cls, module: nn.modules.batchnorm._BatchNorm, keep_affine: bool = False,
                    max_tasks: Optional[int] = None, keep_stats: bool = False, **kwargs) -> "TaskBatchNorm":
        """A per-task twin of a BatchNorm; its affine parameters kept frozen only if ``keep_affine``, its running
        statistics kept as every new task's starting statistics only if ``keep_stats``.

        A cumulative-average BatchNorm (``momentum=None``) becomes an exponential one with momentum 0.1.
        ``kwargs`` go to the constructor (a subclass's own arguments).
        """
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise SupsupError(f"TaskBatchNorm.from_module needs a BatchNorm layer, got {type(module).__name__}")
        affine = keep_affine and module.affine
        stats = keep_stats and module.track_running_stats and module.running_mean is not None
        ref = module.running_mean if module.running_mean is not None else module.weight
        return cls(
            module.num_features, module.eps, 0.1 if module.momentum is None else module.momentum,
            module.track_running_stats,
            weight=module.weight if affine else None, bias=module.bias if affine else None,
            max_tasks=max_tasks,
            dtype=None if ref is None else ref.dtype, device=None if ref is None else ref.device,
            init_mean=module.running_mean if stats else None, init_var=module.running_var if stats else None,
            **kwargs,
        )

    # ---- task protocol ---------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self.running_mean.shape[0])

    @property
    def in_training(self) -> bool:
        return self.task_mean is not None

    def _reference_tensor(self) -> torch.Tensor:
        return self.running_mean

    def begin_task(self, task: Optional[int] = None) -> int:
        """Open fresh statistics for task ``num_tasks`` (the kept pretrained statistics, else mean 0 and var 1), or
        reopen frozen task ``task``'s."""
        t = self._task_to_open(task)
        if t < self.num_tasks:
            self.task_mean = self.running_mean[t].clone()
            self.task_var = self.running_var[t].clone()
        elif self.init_mean is not None:
            self.task_mean = self.init_mean.clone()
            self.task_var = self.init_var.clone()
        else:
            self.task_mean = self.running_mean.new_zeros(self.num_features)
            self.task_var = self.task_mean.new_ones(self.num_features)
        self.mode, self.task_id, self.open_task = "train", t, t
        return t

    @torch.no_grad()
    def freeze_task(self) -> int:
        """Store the open task's statistics as row ``task_id``; returns its id; mode becomes ``"task"``."""
        self._check_freeze()
        t = self.open_task
        if t < self.num_tasks:
            self.running_mean[t] = self.task_mean
            self.running_var[t] = self.task_var
        else:
            self.running_mean = torch.cat([self.running_mean, self.task_mean[None]])
            self.running_var = torch.cat([self.running_var, self.task_var[None]])
        self.task_mean = self.task_var = None
        self.mode, self.task_id, self.open_task = "task", t, None
        return t

    @torch.no_grad()
    def delete_task(self, t: int) -> None:
        """Remove frozen task ``t``'s statistics (later tasks move down one id)."""
        self.running_mean = torch.cat([self.running_mean[:t], self.running_mean[t + 1:]])
        self.running_var = torch.cat([self.running_var[:t], self.running_var[t + 1:]])

    def discard_task(self) -> None:
        """Drop the open task's statistics without storing them."""
        self._check_freeze()
        self.task_mean = self.task_var = None
        self._after_discard()

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise SupsupError(f"TaskBatchNorm: input of shape {tuple(x.shape)} must be [B, {self.num_features}, ...]")
        mode = self.mode
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if mode == "task":
            idx = self.task_index
            mean = self.running_mean.index_select(0, idx).squeeze(0)
            var = self.running_var.index_select(0, idx).squeeze(0)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if mode == "rows":
            ids = self._rows_of(x)
            shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
            mean = self.running_mean.index_select(0, ids).to(x.dtype).view(shape)
            var = self.running_var.index_select(0, ids).to(x.dtype).view(shape)
            y = (x - mean) * torch.rsqrt(var + self.eps)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if self.weight is not None:
                y = y * self.weight.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
            return y
        if mode == "superpose":
            a = self.alpha.to(self.running_mean.dtype)
            mean = a @ self.running_mean
            var = (a @ (self.running_var + self.running_mean.square()) - mean.square()).clamp_min(0.0)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
            if self.weight is not None:
                y = y * self.weight.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
            return y
        if self.task_mean is None:
            raise SupsupError("TaskBatchNorm: no task selected: call begin_task() or set_task(t)")
        return F.batch_norm(x, self.task_mean, self.task_var, self.weight, self.bias, self.training, self.momentum,
                            self.eps)

    # ---- state dict: rows follow the saved number of tasks ----------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        c = self.num_features
        ref = self.running_mean
        for name in ("running_mean", "running_var"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                if saved.dim() != 2 or saved.shape[1] != c:
                    raise SupsupError(f"TaskBatchNorm at '{prefix}': saved {name} has shape {tuple(saved.shape)}, "
                                      f"expected [T, {c}]")
                setattr(self, name, torch.empty(saved.shape, dtype=ref.dtype, device=ref.device))
        for name in ("task_mean", "task_var"):
            present = prefix + name in state_dict
            if present and getattr(self, name) is None:
                setattr(self, name, torch.empty(c, dtype=ref.dtype, device=ref.device))
            elif not present and getattr(self, name) is not None:
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.running_mean.shape[0] != self.running_var.shape[0]:
            raise SupsupError(f"TaskBatchNorm at '{prefix}': running_mean and running_var hold different numbers "
                              f"of tasks ({self.running_mean.shape[0]} vs {self.running_var.shape[0]})")
        self._mode_after_load()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, tasks={self.num_tasks}, "
                f"mode={self.mode!r}, task_id={self.task_id}, affine={self.weight is not None}, "
                f"pretrained_stats={self.init_mean is not None}")


# Aliases for readers who expect the dimensional names; one class serves every input rank.
TaskBatchNorm1d = TaskBatchNorm
TaskBatchNorm2d = TaskBatchNorm
