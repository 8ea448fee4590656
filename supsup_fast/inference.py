"""Task inference without a task id (the GN scenarios): which stored supermask fits this input?

The superposed network ``f(x; W * sum_t alpha_t M_t)`` is evaluated at ``alpha`` uniform over
the candidate tasks, and the gradient of an objective (output entropy, or the G objective with
superfluous output neurons) with respect to ``alpha`` says which masks make the output more
confident: the task is the one with the most negative gradient. Everything runs through the
packed ops -- the forward through ``ops.superpose`` and ``d obj / d alpha`` through
``ops.mask_dots`` -- so no float ``[T, N, K]`` mask stack is ever built.

Methods (``infer_task(method=...)``):

* ``"one_shot"`` -- one forward and one backward; ``task = argmin_i d obj / d alpha_i``.
* ``"binary"`` -- keep the ``ceil(n/2)`` candidates with the lowest gradient (ties go to the lower
  task id), reset ``alpha`` uniform over the survivors (0 elsewhere, so their masks are skipped),
  repeat until one remains: ``ceil(log2 k)`` passes.
* ``"gradient_descent"`` -- ``alpha = softmax(theta)`` over the candidates; ``theta`` descends the
  objective (normalised steps of ``lr`` logits) until ``max alpha >= threshold`` or ``max_steps``.

Batch handling (``batch_mode=...``):

* ``"batch"`` -- one task for the whole batch, inferred from its first ``rows`` rows (the paper
  uses ``rows=1``; ``rows=None`` uses every row); the objective is the mean over those rows.
* ``"per_example"`` -- every row gets its own task. One forward and one backward serve all rows:
  the objective is the *sum* of the rows' own objectives, so the gradient reaching a masked
  layer's output row ``r`` is row ``r``'s alone, and ``d obj_r / d alpha_t =
  sum_layers <(dy_r^T x_r) * W, M_t>`` is one ``ops.mask_dots`` call on per-row weight gradients
  (computed in row chunks so memory stays bounded). Binary search and gradient descent group the
  rows that share an ``alpha`` into one pass.

Confidence: ``max_i softmax(-g)_i`` over the candidates, ``g`` the final pass's per-row alpha
gradient (the belief ``nu`` of the NNs novelty test); in ``[1/n, 1]`` for ``n`` candidates of
that pass. Gradient descent reports its final ``max alpha`` instead.

Rows must not interact: run inference with the model in ``eval()`` mode (batch statistics in
training-mode normalisation couple the rows of a batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import convert, ops
from .errors import SupsupError
from .nn import MaskedLayerBase
from .nn._model import model_device, preserved_mode, task_modules  # noqa: F401  (preserved_mode re-exported)
from .objectives import OBJECTIVES, entropy_rows, g_rows, objective_rows  # noqa: F401  (re-exported)

METHODS = ("one_shot", "binary", "gradient_descent")
BATCH_MODES = ("batch", "per_example")

#: Per-example weight gradients are formed for at most this many elements at a time.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


# ======================================================================================
# Model state: inference switches layers to superposition and puts them back afterwards
# ======================================================================================
def _learned_tasks(model: nn.Module) -> int:
    k = convert.num_tasks(model)
    if k < 1:
        raise SupsupError("task inference needs at least one learned (frozen) task; the model has none")
    return k


def _candidate_mask(model: nn.Module, candidates, device) -> torch.Tensor:
    """Bool ``[T]``: which learned tasks may be chosen (default: all of them)."""
    t = _learned_tasks(model)
    if candidates is None:
        return torch.ones(t, dtype=torch.bool, device=device)
    ids = torch.as_tensor(candidates, dtype=torch.int64).flatten().to(device)
    if ids.numel() == 0:
        raise SupsupError("candidates is empty: at least one learned task must be a candidate")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= t:
        raise SupsupError(f"candidates must be learned task ids in 0..{t - 1}, got min {lo}, max {hi}")
    mask = torch.zeros(t, dtype=torch.bool, device=device)
    mask[ids] = True
    return mask


def _uniform(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``alpha`` uniform over the ``True`` entries of ``mask`` (``[..., T]``), zero elsewhere."""
    m = mask.to(dtype)
    return m / m.sum(-1, keepdim=True)


# ======================================================================================
# The alpha gradient
# ======================================================================================
def alpha_gradients(
    model: nn.Module,
    x: torch.Tensor,
    alpha: torch.Tensor,
    *,
    objective: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "entropy",
    num_real: Optional[int] = None,
    per_example: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``d obj / d alpha`` of the superposed model at ``alpha`` (``[T]`` over all learned tasks).

    ``per_example=False``: ``obj`` is the mean over rows of the per-row objective; returns ``[T]``.
    ``per_example=True``: every row's own objective's gradient; returns ``[B, T]``.
    ``objective`` is ``"entropy"``, ``"g"`` (needs ``num_real``) or a callable mapping logits
    ``[B, C]`` to per-row objectives ``[B]``. The model's mode is restored afterwards.
    """
    rows_fn = objective if callable(objective) else objective_rows(objective, num_real)
    t = _learned_tasks(model)
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (t,) or not alpha.is_floating_point():
        raise SupsupError(f"alpha must be a float tensor of shape [{t}] (one weight per learned task)")
    if x.dim() < 1 or x.shape[0] == 0:
        raise SupsupError(f"x must be a batch with at least one row, got shape {tuple(x.shape)}")
    with preserved_mode(model), torch.enable_grad():
        leaf = alpha.detach().clone().float().requires_grad_(True)
        leaf = convert.set_superposition(model, leaf, requires_grad=True)
        if not per_example:
            obj = _rows(rows_fn, model(x), x.shape[0]).mean()
            (g,) = torch.autograd.grad(obj, leaf, allow_unused=True)
            return torch.zeros_like(leaf) if g is None else g.detach()
        return _per_example_gradients(model, x, leaf, rows_fn, chunk_elements)


def _rows(rows_fn, logits: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SupsupError(f"task inference needs the model to return logits of shape [B, C], got {shape}")
    out = rows_fn(logits)
    if out.shape != (batch,):
        raise SupsupError(f"the objective must return one value per row, shape [{batch}], got {tuple(out.shape)}")
    return out


def _per_example_gradients(model, x, leaf, rows_fn, chunk_elements) -> torch.Tensor:
    layers = task_modules(model)
    records: list[tuple[nn.Module, torch.Tensor, list]] = []

    def hook(layer, inputs, output):
        slot: list = []
        # a tensor hook registered now sees the gradient of this very output, even if a later
        # in-place op (ReLU(inplace=True)) rewrites it
        output.register_hook(lambda g: slot.append(g.detach()))
        records.append((layer, inputs[0].detach(), slot))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        obj = _rows(rows_fn, model(x), x.shape[0]).sum()
        torch.autograd.grad(obj, leaf, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    b, t = x.shape[0], leaf.shape[0]
    out = torch.zeros(b, t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=leaf.device)
    for layer, inp, slot in records:
        if not slot:  # this output did not reach the objective
            continue
        if inp.shape[0] != b:
            raise SupsupError(
                f"per-example inference needs every masked layer to see the batch dimension first; "
                f"{type(layer).__name__} got input of shape {tuple(inp.shape)} for a batch of {b}"
            )
        if isinstance(layer, MaskedLayerBase):
            part = _layer_row_dots(layer, inp, slot[0], chunk_elements)
        else:
            part = _module_row_grads(layer, inp, slot[0], leaf, chunk_elements)
        out += part.to(out.dtype)
    return out


def _module_row_grads(module, x: torch.Tensor, dy: torch.Tensor, leaf: torch.Tensor, chunk_elements: int):
    """Per-row ``d <dy_r, module(x_r)> / d alpha`` of a task module whose output depends on ``alpha``
    directly (per-task normalisation in superposition mixes its statistics with ``alpha``).

    The module is re-run on its recorded (detached) input, so only its own dependence on ``alpha``
    is differentiated; a batched backward gives every row its own gradient.
    """
    per_row = max(1, dy[0].numel())
    step = max(1, int(math.isqrt(max(1, int(chunk_elements) // per_row))))
    parts = []
    for s in range(0, x.shape[0], step):
        xs, gs = x[s:s + step], dy[s:s + step]
        y = module(xs)
        if not y.requires_grad:  # this module does not depend on alpha
            parts.append(leaf.new_zeros(xs.shape[0], leaf.shape[0]))
            continue
        r = xs.shape[0]
        eye = torch.eye(r, dtype=gs.dtype, device=gs.device).view((r, r) + (1,) * (gs.dim() - 1))
        (g,) = torch.autograd.grad(y, leaf, grad_outputs=eye * gs.unsqueeze(0), is_grads_batched=True,
                                   allow_unused=True)
        parts.append(leaf.new_zeros(r, leaf.shape[0]) if g is None else g.detach())
    return torch.cat(parts, 0)


def _layer_row_dots(layer, x: torch.Tensor, dy: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``<(dy_r^T x_r) * W, M_t>`` for every row ``r`` and stored task ``t`` of one layer."""
    w = layer.weight
    n = w.shape[0]
    k = w.numel() // n
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    w2 = w.reshape(n, k).to(acc)
    step = max(1, int(chunk_elements) // max(1, n * k))
    grad_fn = _conv_row_grads if w.dim() == 4 else _linear_row_grads
    parts = []
    for s in range(0, x.shape[0], step):
        g = grad_fn(layer, x[s:s + step].to(acc), dy[s:s + step].to(acc))  # [r, N, K]
        parts.append(ops.mask_dots((g * w2).contiguous(), layer.bank))
    return torch.cat(parts, 0)


def _linear_row_grads(layer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    r = x.shape[0]
    return torch.einsum("rpn,rpk->rnk", dy.reshape(r, -1, dy.shape[-1]), x.reshape(r, -1, x.shape[-1]))


def _conv_row_grads(layer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if getattr(layer, "padding_mode", "zeros") != "zeros" or isinstance(layer.padding, str):
        raise SupsupError(
            f"per-example inference supports zero padding given as integers; this layer has "
            f"padding={layer.padding!r}, padding_mode={getattr(layer, 'padding_mode', 'zeros')!r}"
        )
    if x.dim() == 3:
        x, dy = x.unsqueeze(0), dy.unsqueeze(0)
    o, cg, kh, kw = layer.weight.shape
    groups = layer.groups
    r = x.shape[0]
    cols = F.unfold(x, (kh, kw), dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    cols = cols.reshape(r, groups, cg * kh * kw, -1)
    dyy = dy.reshape(r, groups, o // groups, -1)
    return torch.einsum("rgol,rgkl->rgok", dyy, cols).reshape(r, o, cg * kh * kw)


# ======================================================================================
# The result
# ======================================================================================
@dataclass
class TaskInference:
    """What :func:`infer_task` found.

    Attributes:
        task_ids: int64 ``[1]`` (batch mode: one task for the batch) or ``[B]`` (per example).
        confidence: float ``[same]`` in ``[0, 1]`` (see the module docstring).
        passes: forward+backward passes run (per group of rows for per-example binary search).
        alphas: per pass, the ``alpha`` used, ``[U, T]`` (``U`` = 1 in batch mode, else rows).
        grads: per pass, ``d obj / d alpha``, ``[U, T]`` (gradient descent: NaN for units that
            had already reached the threshold and took no step).
    """

    task_ids: torch.Tensor
    confidence: torch.Tensor
    passes: int = 0
    alphas: list = field(default_factory=list)
    grads: list = field(default_factory=list)


def belief(grads: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``nu = softmax(-g)`` over the candidates (0 elsewhere), row-wise over ``[..., T]``."""
    logits = torch.where(candidates, -grads.float(), torch.tensor(-math.inf, device=grads.device))
    return torch.softmax(logits, dim=-1)


# ======================================================================================
# Inference
# ======================================================================================
def infer_task(
    model: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "one_shot",
    objective: str = "entropy",
    num_real: Optional[int] = None,
    batch_mode: str = "batch",
    rows: Optional[int] = 1,
    candidates: Optional[Sequence[int]] = None,
    lr: float = 1.0,
    threshold: float = 0.99,
    max_steps: int = 100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> TaskInference:
    """Infer the task of ``x`` among the model's learned tasks (or ``candidates``), without a task id.

    See the module docstring for ``method``, ``objective`` and ``batch_mode``. ``rows`` (batch mode
    only) is how many leading rows the inference looks at (``None`` = all). ``lr``, ``threshold``
    and ``max_steps`` configure ``"gradient_descent"``. The model's mode is restored afterwards.
    """
    if method not in METHODS:
        raise SupsupError(f"unknown method {method!r}; expected one of {METHODS}")
    if batch_mode not in BATCH_MODES:
        raise SupsupError(f"unknown batch_mode {batch_mode!r}; expected one of {BATCH_MODES}")
    rows_fn = objective_rows(objective, num_real)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise SupsupError(f"x must be a non-empty batch tensor, got {getattr(x, 'shape', type(x).__name__)}")
    per_example = batch_mode == "per_example"
    if not per_example:
        if rows is not None:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise SupsupError(f"rows must be a positive int or None, got {rows!r}")
            x = x[:rows]
    cand = _candidate_mask(model, candidates, model_device(model))

    def grads_of(xs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``[U, T]`` gradients: one row for batch mode, one per row of ``xs`` otherwise."""
        g = alpha_gradients(model, xs, alpha, objective=rows_fn, per_example=per_example,
                            chunk_elements=chunk_elements)
        return g if per_example else g.unsqueeze(0)

    units = x.shape[0] if per_example else 1
    if method == "gradient_descent":
        return _gradient_descent(x, cand, units, grads_of, per_example, lr, threshold, max_steps)
    return _halving(x, cand, units, grads_of, per_example, one_shot=(method == "one_shot"))


def _groups(alphas: torch.Tensor):
    """Index tensors of units sharing the same alpha row."""
    uniq, inverse = torch.unique(alphas, dim=0, return_inverse=True)
    return [(uniq[i], torch.nonzero(inverse == i).flatten()) for i in range(uniq.shape[0])]


def _grads_grouped(x, alphas, grads_of, units_are_rows: bool):
    """Run one pass per distinct alpha; returns ``[U, T]`` gradients and the number of passes."""
    if not units_are_rows:
        return grads_of(x, alphas[0]), 1
    out = torch.empty(alphas.shape, dtype=torch.float32, device=alphas.device)
    groups = _groups(alphas)
    for alpha, idx in groups:
        out[idx] = grads_of(x[idx], alpha).float()
    return out, len(groups)


def _halving(x, cand, units, grads_of, per_row: bool, one_shot: bool) -> TaskInference:
    alive = cand.unsqueeze(0).expand(units, -1).clone()
    result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0))
    if int(cand.sum()) == 1:  # nothing to decide: no pass needed
        result.task_ids = alive.float().argmax(-1)
        result.confidence = torch.ones(units, device=cand.device)
        return result
    while True:
        alpha = _uniform(alive)
        g, passes = _grads_grouped(x, alpha, grads_of, per_row)
        result.passes += passes
        result.alphas.append(alpha)
        result.grads.append(g)
        conf = belief(g, alive).max(-1).values
        counts = alive.sum(-1)
        if one_shot:
            masked = torch.where(alive, g, torch.tensor(math.inf, device=g.device))
            ids = masked.argmin(-1)  # first minimum: ties go to the lower task id
            break
        # keep the ceil(n/2) lowest gradients of each unit's survivors; stable sort -> lower id first
        masked = torch.where(alive, g, torch.tensor(math.inf, device=g.device))
        order = torch.sort(masked, dim=-1, stable=True).indices
        keep = (counts + 1) // 2
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        alive = alive & (rank < keep.unsqueeze(1))
        if bool((alive.sum(-1) == 1).all()):
            ids = alive.float().argmax(-1)
            break
    result.task_ids = ids.to(torch.int64)
    result.confidence = conf.clamp(0.0, 1.0)
    return result


def _gradient_descent(x, cand, units, grads_of, per_row, lr, threshold, max_steps) -> TaskInference:
    if not (0.0 < threshold <= 1.0):
        raise SupsupError(f"threshold must be in (0, 1], got {threshold}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise SupsupError(f"max_steps must be a positive int, got {max_steps!r}")
    if not lr > 0:
        raise SupsupError(f"lr must be positive, got {lr}")
    alive = cand.unsqueeze(0).expand(units, -1)
    theta = torch.zeros(alive.shape, device=cand.device)
    neg_inf = torch.tensor(-math.inf, device=cand.device)
    result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0))
    for _ in range(max_steps):
        alpha = torch.softmax(torch.where(alive, theta, neg_inf), dim=-1)
        todo = torch.nonzero(alpha.max(-1).values < threshold).flatten()  # each unit stops on its own
        if todo.numel() == 0:
            break
        a = alpha[todo]
        g, passes = _grads_grouped(x[todo] if per_row else x, a, grads_of, per_row)
        result.passes += passes
        result.alphas.append(alpha)
        result.grads.append(torch.full(alpha.shape, math.nan, device=g.device).index_copy(0, todo, g.float()))
        # chain rule through the softmax, then a step of lr logits along the normalised direction
        live = alive[todo]
        d = a * (g - (a * torch.where(live, g, 0.0)).sum(-1, keepdim=True))
        d = torch.where(live, d, 0.0)
        scale = d.abs().amax(-1, keepdim=True)
        theta[todo] = theta[todo] - lr * d / torch.where(scale > 0, scale, 1.0)
    alpha = torch.softmax(torch.where(alive, theta, neg_inf), dim=-1)
    result.task_ids = alpha.argmax(-1).to(torch.int64)
    result.confidence = alpha.max(-1).values.clamp(0.0, 1.0)
    return result


# ======================================================================================
# Prediction and scoring
# ======================================================================================
def predict(model: nn.Module, x: torch.Tensor, **infer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Infer the task, then classify with the inferred task's mask.

    Returns ``(task_ids [B], classes [B])``: in batch mode every row gets the batch's task. Classes
    are the argmax over all outputs (superfluous neurons included, as in the paper: the labels
    live in the real range, so a superfluous winner counts as wrong). Takes :func:`infer_task`'s
    keyword arguments; the model's mode is restored afterwards.
    """
    inf = infer_task(model, x, **infer_kwargs)
    ids = inf.task_ids.to(x.device)
    if ids.numel() == 1:
        ids = ids.expand(x.shape[0])
    return ids.clone(), classify(model, x, ids)


def classify(model: nn.Module, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Classes of every row of ``x`` with its task's mask (``task_ids [B]``): the argmax over all
    outputs, superfluous neurons included. The model's mode is restored afterwards."""
    classes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    with preserved_mode(model), torch.no_grad():
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            convert.set_task(model, int(t))
            classes[rows] = model(x[rows]).argmax(-1)
    return classes


def gnu_correct(task_pred, class_pred, task_true, class_true) -> torch.Tensor:
    """GNu (unshared labels): a prediction counts only if both task and class are right."""
    task_true = torch.as_tensor(task_true, device=task_pred.device).expand_as(task_pred)
    return (task_pred == task_true) & (class_pred == torch.as_tensor(class_true, device=class_pred.device))


def gns_correct(class_pred, class_true) -> torch.Tensor:
    """GNs (labels shared across tasks): the class alone is scored."""
    return class_pred == torch.as_tensor(class_true, device=class_pred.device)


def evaluate_inference(
    model: nn.Module,
    batches: Iterable,
    *,
    task: Optional[int] = None,
    scenario: str = "GNu",
    **infer_kwargs,
) -> dict:
    """Accuracy without task identity over ``batches`` of ``(x, y)`` (true task ``task``) or ``(x, y, t)``.

    Returns ``{"accuracy", "task_accuracy", "count"}``; ``scenario`` is ``"GNu"`` or ``"GNs"``.
    """
    if scenario not in ("GNu", "GNs"):
        raise SupsupError(f"scenario must be 'GNu' or 'GNs', got {scenario!r}")
    correct = task_correct = count = 0
    for batch in batches:
        if len(batch) == 3:
            x, y, t = batch
        elif len(batch) == 2:
            if task is None:
                raise SupsupError("batches of (x, y) need task=<the true task id>; or yield (x, y, task)")
            (x, y), t = batch, task
        else:
            raise SupsupError(f"batches must yield (x, y) or (x, y, task), got {len(batch)} items")
        device = model_device(model)
        x, y = x.to(device), torch.as_tensor(y).to(device)
        t = torch.as_tensor(t, dtype=torch.int64).to(device)
        ids, classes = predict(model, x, **infer_kwargs)
        hit_task = ids == t
        hit = gnu_correct(ids, classes, t, y) if scenario == "GNu" else gns_correct(classes, y)
        correct += int(hit.sum())
        task_correct += int(hit_task.sum())
        count += x.shape[0]
    if count == 0:
        raise SupsupError("evaluate_inference got no batches")
    return {"accuracy": correct / count, "task_accuracy": task_correct / count, "count": count}
