"""Training one task's supermask, and scoring a network on a task.

The layers already make any training loop work (``begin_task`` -> an optimizer over
``task_parameters(model)`` -> ``loss.backward()`` -> ``step()`` -> ``freeze_task``);
:func:`fit_task` is that loop, ready made, with the paper's defaults:

* MNIST (GNu) nets: RMSprop, lr 1e-4, 1000 batches of 128 per task;
* CIFAR (GG) nets: Adam, lr 1e-3, cosine schedule, weight decay 1e-4 on the scores.

Superfluous output neurons (``s`` outputs beyond the ``l`` real classes) need nothing special:
as in the paper, cross-entropy runs over *all* outputs with labels in the real range, which
pushes the superfluous logits down -- exactly what the G objective of task inference exploits.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import convert
from .errors import SupsupError
from .nn._model import model_device, preserved_mode  # noqa: F401  (model_device re-exported)

OPTIMIZERS = ("rmsprop", "adam", "sgd")
#: Learning rates used when ``lr=None`` (the paper's: RMSprop for MNIST nets, Adam for CIFAR nets).
DEFAULT_LR = {"rmsprop": 1e-4, "adam": 1e-3, "sgd": 0.1}

OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def _check_optimizer(optimizer, lr, weight_decay) -> None:
    if callable(optimizer):
        return
    if optimizer not in OPTIMIZERS:
        raise SupsupError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> Optimizer, got {optimizer!r}")
    if lr is not None and not float(lr) > 0:
        raise SupsupError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise SupsupError(f"weight_decay must be >= 0, got {weight_decay}")


def make_optimizer(params: list, optimizer: Union[str, OptimizerFactory] = "rmsprop", lr: Optional[float] = None,
                   weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimizer over ``params``: a name in :data:`OPTIMIZERS` or a factory ``params -> Optimizer``."""
    if callable(optimizer):
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise SupsupError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    _check_optimizer(optimizer, lr, weight_decay)
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def cycle(batches: Iterable):
    """Yield from ``batches`` forever, re-iterating it (a DataLoader reshuffles each pass)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise SupsupError("batches yielded nothing")
        if iter(batches) is batches:  # a one-shot iterator cannot be restarted
            raise SupsupError("batches ran out before the requested iterations; pass a re-iterable (a list or "
                              "DataLoader) or lower iterations")


def _split(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SupsupError("batches must yield (x, y) pairs")
    return batch[0], batch[1]


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """Refuse a NaN / inf loss before it reaches the optimizer (it would turn every score it touches to NaN)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise SupsupError(f"{where}: the loss is not finite ({float(loss.detach().float().sum())}): the batch or the "
                          "model's output holds NaN or inf; nothing was updated")


def fit_task(
    model: nn.Module,
    batches: Iterable,
    *,
    iterations: int,
    optimizer: Union[str, OptimizerFactory] = "rmsprop",
    lr: Optional[float] = None,
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool = True,
    scheduler: Optional[str] = None,
    on_step: Optional[Callable[[int, float], Optional[bool]]] = None,
    task: Optional[int] = None,
    desc: Optional[str] = None,
) -> dict:
    """Learn one task's supermask: begin it, train its scores for ``iterations`` batches, freeze it.

    Args:
        model: a converted model (:func:`~supsup_fast.convert.convert_`) with no task in training.
        batches: re-iterable of ``(x, y)`` (cycled if shorter than ``iterations``).
        iterations: optimizer steps.
        optimizer: ``"rmsprop"``, ``"adam"``, ``"sgd"`` (momentum 0.9) or ``params -> Optimizer``.
        lr: learning rate (``None``: :data:`DEFAULT_LR` of the named optimizer).
        weight_decay: on the scores (named optimizers only).
        loss_fn: ``loss_fn(logits, y)``; cross-entropy over all outputs by default.
        progress: show a tqdm bar.
        scheduler: ``"cosine"`` (to 0 over ``iterations``) or ``None``.
        on_step: ``on_step(step, loss)`` after every step; returning ``True`` stops early.
        task: reopen frozen task ``task`` instead of beginning a new one (its mask is the start).

    Returns:
        ``{"task", "losses", "accuracy" (running training accuracy per step), "iterations", "seconds"}``.
        The model is left in ``"task"`` mode on the new task; on an exception the task stays open.

    A loss that is not finite (a NaN / inf in the batch or the model's output) stops training with a
    :class:`SupsupError` before that step's update, so no score is touched by it (one device sync a step).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise SupsupError(f"iterations must be a positive int, got {iterations!r}")
    if scheduler not in (None, "cosine"):
        raise SupsupError(f"scheduler must be 'cosine' or None, got {scheduler!r}")
    _check_optimizer(optimizer, lr, weight_decay)
    device = model_device(model)
    t = convert.begin_task(model, task)
    opt = make_optimizer(convert.task_parameters(model), optimizer, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations) if scheduler == "cosine" else None
    was_training = model.training
    model.train()
    losses, hits, counts = [], [], []
    bar = _bar(iterations, progress, desc or f"task {t}")
    start = time.perf_counter()
    try:
        for step, batch in zip(range(iterations), cycle(batches)):
            x, y = _split(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            check_finite_loss(loss, f"fit_task (task {t}, step {step})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss.detach())
            if logits.dim() == 2 and y.dim() == 1:
                hits.append((logits.detach().argmax(-1) == y).sum())
                counts.append(y.shape[0])
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == iterations - 1:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if on_step is not None and on_step(step, float(loss.detach())):
                break
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    t = convert.freeze_task(model)
    losses_f = torch.stack(losses).float().tolist() if losses else []
    acc = (torch.stack(hits).float() / torch.tensor(counts, dtype=torch.float32, device=hits[0].device)).tolist() \
        if hits else []
    return {"task": t, "losses": losses_f, "accuracy": acc, "iterations": len(losses_f),
            "seconds": time.perf_counter() - start}


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    task: Optional[int] = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict:
    """Accuracy of ``model`` on ``batches`` of ``(x, y)``, in ``eval()`` mode.

    ``task``: apply that task's mask (GG: the task is given); ``None`` uses the model as it is set.
    Classes are the argmax over all outputs. Returns ``{"accuracy", "loss", "count"}`` (loss is
    the mean of ``loss_fn`` over rows, computed with the default ``reduction='mean'`` per batch
    and weighted by batch size). The model's mode and training flag are restored afterwards.
    """
    device = model_device(model)
    was_training = model.training
    correct = count = 0
    loss_sum = 0.0
    with preserved_mode(model):
        if task is not None:
            convert.set_task(model, task)
        model.eval()
        try:
            for batch in batches:
                x, y = _split(batch)
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += float(loss_fn(logits, y)) * y.shape[0]
                correct += int((logits.argmax(-1) == y).sum())
                count += y.shape[0]
        finally:
            model.train(was_training)
    if count == 0:
        raise SupsupError("evaluate got no batches")
    return {"accuracy": correct / count, "loss": loss_sum / count, "count": count}
