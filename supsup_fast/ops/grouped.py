"""Many tasks in one batch: row ``i`` of ``x`` goes through task ``task_ids[i]``'s mask.

* ``masked_linear_grouped(x, W, bank, task_ids, b)`` -- ``y_i = x_i (W * M_{t_i})^T + b``;
* ``masked_linear_grouped_grad_input(dy, W, bank, task_ids)`` -- its input gradient.
"""

from __future__ import annotations

import torch

from ._checks import check_bias, check_float, check_same_device, check_words, flat, require
from ._define import define, on_first
from ._fastpath import call, fast, traced


def _grouped_setup(ctx, inputs, output):
    x, weight, bank, task_ids, bias = inputs
    ctx.save_for_backward(weight, bank, task_ids)
    ctx.has_bias = bias is not None


def _grouped_bwd(ctx, grad):
    weight, bank, task_ids = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = fast.masked_linear_grouped_grad_input(grad, weight, bank, task_ids)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = flat(grad).sum(0)
    return gx, None, None, None, gb


def _check_task_ids(task_ids, rows: int, tasks: int) -> None:
    require(isinstance(task_ids, torch.Tensor) and task_ids.dtype in (torch.int32, torch.int64)
            and task_ids.shape == (rows,),
            lambda: f"task_ids must be int32/int64 of shape [{rows}], got "
            f"{getattr(task_ids, 'dtype', type(task_ids).__name__)} {tuple(getattr(task_ids, 'shape', ()))}")
    if not task_ids.numel() or traced():
        return
    if task_ids.device.type == "cuda":
        # no host sync (graph capture, fullgraph compile): an out-of-range id fails a device assert
        torch._assert_async(((task_ids >= 0) & (task_ids < tasks)).all(), f"task id out of range [0, {tasks})")
    else:
        lo, hi = int(task_ids.min()), int(task_ids.max())
        require(lo >= 0 and hi < tasks, lambda: f"task id out of range [0, {tasks}): min {lo}, max {hi}")


def _check_grouped(x, weight, bank, task_ids, bias) -> None:
    check_float("x", x)
    check_float("weight", weight)
    require(x.dim() == 2, lambda: f"masked_linear_grouped needs x of shape [M, K], got {tuple(x.shape)}")
    require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    require(weight.dim() == 2 and x.shape[1] == weight.shape[1],
            lambda: f"x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on K")
    check_words("bank", bank, weight.shape[0], weight.shape[1], 1)
    _check_task_ids(task_ids, x.shape[0], bank.shape[0])
    check_bias(bias, weight.shape[0], x.dtype)
    check_same_device(x=x, weight=weight, bank=bank, task_ids=task_ids, bias=bias)


def _check_grouped_grad_input(grad_out, weight, bank, task_ids) -> None:
    check_float("grad_out", grad_out)
    check_float("weight", weight)
    require(grad_out.dim() == 2 and weight.dim() == 2 and grad_out.shape[1] == weight.shape[0],
            lambda: f"grad_out {tuple(grad_out.shape)} must be [M, N] for weight {tuple(weight.shape)}")
    check_words("bank", bank, weight.shape[0], weight.shape[1], 1)
    _check_task_ids(task_ids, grad_out.shape[0], bank.shape[0])
    check_same_device(grad_out=grad_out, weight=weight, bank=bank, task_ids=task_ids)


define("masked_linear_grouped(Tensor x, Tensor weight, Tensor bank, Tensor task_ids, Tensor? bias) -> Tensor",
       dispatch=on_first, fake=lambda x, weight, bank, task_ids, bias: x.new_empty((x.shape[0], weight.shape[0])),
       backward=_grouped_bwd, setup_context=_grouped_setup, check=_check_grouped)


def _grouped_grad_input_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_grad_input_bwd(ctx, gg):
    grad_out, weight, bank, task_ids = ctx.saved_tensors
    return fast.masked_linear_grouped(gg, weight, bank, task_ids, None), None, None, None


define("masked_linear_grouped_grad_input(Tensor grad_out, Tensor weight, Tensor bank, Tensor task_ids) -> Tensor",
       dispatch=on_first,
       fake=lambda grad_out, weight, bank, task_ids: grad_out.new_empty((grad_out.shape[0], weight.shape[1])),
       backward=_grouped_grad_input_bwd, setup_context=_grouped_grad_input_setup, check=_check_grouped_grad_input)


def masked_linear_grouped(x, weight, bank, task_ids, bias=None):
    """Row ``i`` of ``x [M, K]`` through task ``task_ids[i]``'s mask (serving many tasks in one batch)."""
    _check_grouped(x, weight, bank, task_ids, bias)
    return call("masked_linear_grouped", x, weight, bank, task_ids.to(torch.int64), bias)


def masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
    """``dL/dx_i = dL/dy_i (W * M_{t_i})``: the input gradient of :func:`masked_linear_grouped`."""
    _check_grouped_grad_input(grad_out, weight, bank, task_ids)
    return call("masked_linear_grouped_grad_input", grad_out, weight, bank, task_ids.to(torch.int64))
