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
* ``"shortlist"`` -- candidates are judged by their *own* networks: candidate ``i`` is scored by
  the output entropy under its mask alone (``alpha = e_i``), every (row, candidate) pair one
  row of a single batched forward pass (rows x candidates through ``ops.masked_linear_grouped``),
  and the lowest mean score wins (ties: the lower task id). The gradient at a uniform ``alpha``
  ranks well when masks differ (PermutedMNIST) but poorly among masks that look alike
  (RotatedMNIST's neighbouring angles), where the own networks still separate. To bound the
  cost, the candidates are first narrowed to at most ``shortlist`` (``shortlist_by``):

  - ``"rows"``: by the same own-network scores on only the first ``shortlist_rows`` rows; the
    survivors are then scored on all rows. In per-example mode a row is all there is, so every
    candidate is scored on it (no narrowing: cost grows with the number of tasks);
  - ``"one_shot"``: the ``shortlist`` lowest gradients of one pass at ``alpha`` uniform;
  - ``"binary"``: binary search, stopped once at most ``shortlist`` candidates remain;
  - ``"auto"`` (default): ``"rows"`` in batch mode, ``"one_shot"`` per example.

  The score (``shortlist_score``) is the output entropy or the negated logit margin, top logit
  minus the runner-up (:func:`~supsup_fast.objectives.score_rows`); ``"auto"`` (default): the
  margin when a score is a mean over two or more rows (batch mode: it separates look-alike masks
  better, RotatedMNIST at FC-1024 100% of batches against the entropy's 96.9%), the entropy when it
  is one row's (per example, or a batch of one row: a single margin is a noisy gap, PermutedMNIST
  single images 90.1% against 99.9%). Either is used whatever ``objective`` the gradient narrows
  by: the G objective has no value to compare across networks (its real-class logits are detached
  for the gradient only). Confidence: ``max softmax(-n * score)`` over the final survivors, ``n``
  the rows a score averages (1 per example).

Batch handling (``batch_mode=...``):

* ``"batch"`` -- one task for the whole batch, inferred from its first ``rows`` rows (the paper
  uses ``rows=1``; ``rows=None`` uses every row); the objective is the mean over those rows.
* ``"per_example"`` -- every row gets its own task. One forward and one backward serve all rows:
  the objective is the *sum* of the rows' own objectives, so the gradient reaching a masked
  layer's output row ``r`` is row ``r``'s alone, and ``d obj_r / d alpha_t =
  sum_layers <(dy_r^T x_r) * W, M_t>`` is one ``ops.mask_dots`` call on per-row weight gradients
  (computed in row chunks so memory stays bounded). Binary search and gradient descent group the
  rows that share an ``alpha`` into one pass.

Confidence (gradient methods): ``max_i softmax(-g)_i`` over the candidates, ``g`` the final pass's per-row alpha
gradient (the belief ``nu`` of the NNs novelty test); in ``[1/n, 1]`` for ``n`` candidates of
that pass. Gradient descent reports its final ``max alpha`` instead.

Rows never interact: inference (and :func:`classify` / :func:`task_logits`) runs the model with
every module in ``eval()`` mode, whatever mode it is in (batch statistics of a training-mode
BatchNorm would couple the rows of a batch and update its running statistics; dropout would make
rows random); each module's ``training`` flag is restored afterwards.

Models that return more than a logits tensor: a Hugging Face ``ModelOutput`` (or any object with a
``logits`` attribute, or a dict with a ``"logits"`` key) is read for its logits; anything else is
mapped to ``[B, C]`` logits by ``logits_fn=`` (e.g. ``lambda out: out[0][:, -1]`` for a language
model's last position).

Non-finite inputs: a unit (a row in per-example mode, the batch in batch mode) whose input rows
hold a NaN or an Inf, or whose objective or alpha gradient over its candidates is not finite in
any pass, gets the task :data:`NO_TASK` (``-1``) with confidence ``0``: no task is claimed and no
NaN confidence is reported. It takes no further passes, so it neither hangs a search nor changes
another row's passes. :func:`predict` / :func:`classify` give its rows the class ``-1``.

Threads: calls on one model take turns (:func:`supsup_fast.nn._model.model_in_use`), so two
threads sharing a model each get their own result; another thread's ``convert.set_task`` /
``set_superposition`` / ``begin_task`` / ``freeze_task`` or forward through the model during a call
raises :class:`~supsup_fast.errors.SupsupError` instead of mixing the two threads' tasks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import convert, ops
from .errors import SupsupError
from .nn import MaskedLayerBase, MaskedLinear
from .nn._model import eval_mode, model_device, model_in_use, preserved_mode, task_modules  # noqa: F401
from .nn.base import TaskModule
from .objectives import OBJECTIVES, SHORTLIST_SCORES, entropy_rows, g_rows, objective_rows, score_rows  # noqa: F401

METHODS = ("one_shot", "binary", "gradient_descent", "shortlist")
SHORTLIST_BY = ("auto", "rows", "one_shot", "binary")
BATCH_MODES = ("batch", "per_example")

#: Per-example weight gradients are formed for at most this many elements at a time.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

#: The task id of a unit whose input or gradients are not finite: no task is claimed for it.
NO_TASK = -1


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
    ids = _candidate_ids(candidates)
    if not ids:
        raise SupsupError("candidates is empty: at least one learned task must be a candidate")
    bad = [i for i in ids if not 0 <= i < t]
    if bad:
        raise SupsupError(f"candidates must be learned task ids in 0..{t - 1}, got {bad[:5]}")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise SupsupError(f"candidates lists task(s) {twice[:5]} more than once; give each task id once")
    mask = torch.zeros(t, dtype=torch.bool, device=device)
    mask[torch.tensor(ids, dtype=torch.int64, device=device)] = True
    return mask


def _candidate_ids(candidates) -> list[int]:
    """``candidates`` as a list of ints: task ids only (an int, a sequence or a 0/1-D integer tensor).

    A bool mask or float values are refused rather than read as ids (``[False, True]`` would be ids
    ``[0, 1]``, ``1.9`` would be truncated to ``1``)."""
    hint = "pass task ids, e.g. candidates=[0, 2] (for a bool mask: torch.nonzero(mask).flatten())"
    if isinstance(candidates, torch.Tensor):
        if candidates.dtype == torch.bool or candidates.is_floating_point() or candidates.is_complex():
            raise SupsupError(f"candidates must hold integer task ids, got a {candidates.dtype} tensor; {hint}")
        if candidates.dim() > 1:
            raise SupsupError(f"candidates must be 1-D task ids, got shape {tuple(candidates.shape)}")
        return [int(i) for i in candidates.flatten().tolist()]
    items = [candidates] if not isinstance(candidates, (str, bytes)) and _is_int(candidates) else candidates
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise SupsupError(f"candidates must be task ids, got {type(candidates).__name__}; {hint}")
    out = []
    for i in items:
        if isinstance(i, torch.Tensor) and i.dim() == 0:
            i = i.item() if i.dtype != torch.bool else bool(i)
        if not _is_int(i):
            raise SupsupError(f"candidates must hold integer task ids, got {i!r} ({type(i).__name__}); {hint}")
        out.append(int(i))
    return out


def _is_int(v) -> bool:
    """An integer that is not a bool (``numbers.Integral`` covers numpy's ints; bools are refused)."""
    import numpy as np  # late: only candidate parsing needs it

    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


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
    logits_fn: Optional[Callable] = None,
) -> torch.Tensor:
    """``d obj / d alpha`` of the superposed model at ``alpha`` (``[T]`` over all learned tasks).

    ``per_example=False``: ``obj`` is the mean over rows of the per-row objective; returns ``[T]``.
    ``per_example=True``: every row's own objective's gradient; returns ``[B, T]``.
    ``objective`` is ``"entropy"``, ``"g"`` (needs ``num_real``) or a callable mapping logits
    ``[B, C]`` to per-row objectives ``[B]``; ``logits_fn`` maps the model's output to those logits (see
    :func:`model_logits`). The model runs in ``eval()`` mode; its modes are restored afterwards. Where the
    objective (of the batch, or of a row) is not finite, the gradient (of the batch, or that row's) is NaN.
    """
    rows_fn = objective if callable(objective) else objective_rows(objective, num_real)
    t = _learned_tasks(model)
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (t,) or not alpha.is_floating_point():
        raise SupsupError(f"alpha must be a float tensor of shape [{t}] (one weight per learned task)")
    if x.dim() < 1 or x.shape[0] == 0:
        raise SupsupError(f"x must be a batch with at least one row, got shape {tuple(x.shape)}")
    chunk_elements = _positive_int(chunk_elements, "chunk_elements")
    with model_in_use(model), eval_mode(model), preserved_mode(model):
        return _alpha_gradients(model, task_modules(model), x, alpha, rows_fn, per_example, chunk_elements, logits_fn)


def _alpha_gradients(model, layers, x, alpha, rows_fn, per_example: bool, chunk_elements: int, logits_fn):
    """:func:`alpha_gradients` on checked arguments, with the model held, in eval mode and its modes restored
    by the caller (task inference runs several passes under one such hold)."""
    with torch.enable_grad():
        leaf = alpha.detach().clone().float().requires_grad_(True)
        for layer in layers:
            layer.set_superposition(leaf)
        if not per_example:
            obj = _rows(rows_fn, model(x), x.shape[0], logits_fn).mean()
            (g,) = torch.autograd.grad(obj, leaf, allow_unused=True)
            g = torch.zeros_like(leaf) if g is None else g.detach()
            return g if math.isfinite(obj.item()) else torch.full_like(g, math.nan)  # no gradient of a NaN
        return _per_example_gradients(model, layers, x, leaf, rows_fn, chunk_elements, logits_fn)


def _positive_int(v, name: str) -> int:
    if not _is_int(v) or v < 1:
        raise SupsupError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def model_logits(out, logits_fn: Optional[Callable] = None) -> torch.Tensor:
    """The logits of a model's output: ``logits_fn(out)`` if given, else ``out.logits`` / ``out["logits"]`` for a
    Hugging Face ``ModelOutput`` (or a dict), else ``out`` itself."""
    if logits_fn is not None:
        return logits_fn(out)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    return out if logits is None else logits


def _rows(rows_fn, logits: torch.Tensor, batch: int, logits_fn: Optional[Callable] = None) -> torch.Tensor:
    logits = model_logits(logits, logits_fn)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SupsupError(f"task inference needs the model to return logits of shape [B, C], got {shape}")
    out = rows_fn(logits)
    if out.shape != (batch,):
        raise SupsupError(f"the objective must return one value per row, shape [{batch}], got {tuple(out.shape)}")
    return out


def _per_example_gradients(model, layers, x, leaf, rows_fn, chunk_elements, logits_fn=None) -> torch.Tensor:
    records: list[tuple[nn.Module, torch.Tensor, list]] = []

    def hook(layer, inputs, output):
        slot: list = []
        # a tensor hook registered now sees the gradient of this very output, even if a later
        # in-place op (ReLU(inplace=True)) rewrites it
        output.register_hook(lambda g: slot.append(g.detach()))
        records.append((layer, inputs[0].detach(), slot))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        obj_rows = _rows(rows_fn, model(x), x.shape[0], logits_fn)
        torch.autograd.grad(obj_rows.sum(), leaf, allow_unused=True)
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
    out[~torch.isfinite(obj_rows.detach()).to(out.device)] = math.nan  # a row without a finite objective
    return out


def _module_row_grads(module, x: torch.Tensor, dy: torch.Tensor, leaf: torch.Tensor, chunk_elements: int):
    """Per-row ``d <dy_r, module(x_r)> / d alpha`` of a task module whose output depends on ``alpha``
    directly (per-task normalisation in superposition mixes its statistics with ``alpha``).

    The module is re-run on its recorded (detached) input, so only its own dependence on ``alpha``
    is differentiated; a batched backward gives every row its own gradient. Rows whose input is not
    finite are left out of that backward (its zero weight on another row's input, 0 * NaN, would
    reach every row) and get NaN.
    """
    finite = _finite_rows(x)
    if not bool(finite.all()):
        out = leaf.new_full((x.shape[0], leaf.shape[0]), math.nan)
        idx = torch.nonzero(finite).flatten()
        if idx.numel():
            out[idx.to(out.device)] = _module_row_grads(module, x[idx], dy[idx], leaf, chunk_elements)
        return out
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
        # batch i carries row i's gradient alone; written, not multiplied by an identity (0 * NaN of
        # another row would be NaN)
        rows = torch.arange(r, device=gs.device)
        grad_outputs = gs.new_zeros((r,) + tuple(gs.shape))
        grad_outputs[rows, rows] = gs
        (g,) = torch.autograd.grad(y, leaf, grad_outputs=grad_outputs, is_grads_batched=True, allow_unused=True)
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
        task_ids: int64 ``[1]`` (batch mode: one task for the batch) or ``[B]`` (per example);
            :data:`NO_TASK` where the input or the gradients were not finite.
        confidence: float ``[same]`` in ``[0, 1]`` (see the module docstring); ``0`` for ``NO_TASK``.
        passes: forward+backward passes run (per group of rows for per-example binary search).
        alphas: per pass, the ``alpha`` used, ``[U, T]`` (``U`` = 1 in batch mode, else rows).
        grads: per pass, ``d obj / d alpha``, ``[U, T]`` (gradient descent: NaN for units that
            had already reached the threshold and took no step; NaN for the units a pass skipped).
        candidates: ``"shortlist"`` only: the survivors each unit scored, int64 ``[U, C]``, ascending.
        scores: ``"shortlist"`` only: their scores under their own masks, ``[U, C]``.
    """

    task_ids: torch.Tensor
    confidence: torch.Tensor
    passes: int = 0
    alphas: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    candidates: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


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
    shortlist: int = 4,
    shortlist_by: str = "auto",
    shortlist_rows: int = 16,
    shortlist_score: str = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    logits_fn: Optional[Callable] = None,
) -> TaskInference:
    """Infer the task of ``x`` among the model's learned tasks (or ``candidates``), without a task id.

    See the module docstring for ``method``, ``objective``, ``batch_mode`` and ``logits_fn`` (for models
    returning a ``ModelOutput`` or other non-tensor output). ``rows`` (batch mode only) is how many leading rows
    the inference looks at (``None`` = all). ``lr``, ``threshold`` and ``max_steps`` configure
    ``"gradient_descent"``; ``shortlist`` (the most survivors scored on all rows), ``shortlist_by``,
    ``shortlist_rows`` and ``shortlist_score`` configure ``"shortlist"``. The model runs in ``eval()`` mode;
    its modes are restored afterwards. Units whose input or gradients are not finite get :data:`NO_TASK`.
    """
    with model_in_use(model), eval_mode(model), preserved_mode(model):
        return _infer_task(model, x, method, objective, num_real, batch_mode, rows, candidates, lr, threshold,
                           max_steps, shortlist, shortlist_by, shortlist_rows, shortlist_score, chunk_elements,
                           logits_fn)


def _infer_task(model, x, method, objective, num_real, batch_mode, rows, candidates, lr, threshold, max_steps,
                shortlist, shortlist_by, shortlist_rows, shortlist_score, chunk_elements, logits_fn) -> TaskInference:
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
    chunk_elements = _positive_int(chunk_elements, "chunk_elements")
    finite_rows = _finite_rows(x).to(cand.device)
    failed = ~finite_rows if per_example else ~finite_rows.all().reshape(1)

    layers = task_modules(model)

    def grads_of(xs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``[U, T]`` gradients: one row for batch mode, one per row of ``xs`` otherwise."""
        g = _alpha_gradients(model, layers, xs, alpha, rows_fn, per_example, chunk_elements, logits_fn)
        return g if per_example else g.unsqueeze(0)

    units = x.shape[0] if per_example else 1
    if method == "shortlist":
        if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
            raise SupsupError(f"shortlist must be a positive int, got {shortlist!r}")
        if shortlist_by not in SHORTLIST_BY:
            raise SupsupError(f"unknown shortlist_by {shortlist_by!r}; expected one of {SHORTLIST_BY}")
        if isinstance(shortlist_rows, bool) or not isinstance(shortlist_rows, int) or shortlist_rows < 1:
            raise SupsupError(f"shortlist_rows must be a positive int, got {shortlist_rows!r}")
        value_fn = score_rows(shortlist_score, one_row=per_example or x.shape[0] == 1)
        by = ("one_shot" if per_example else "rows") if shortlist_by == "auto" else shortlist_by
        return _shortlist(model, x, cand, units, grads_of, per_example, value_fn, shortlist, by, shortlist_rows,
                          chunk_elements, failed)
    if method == "gradient_descent":
        return _gradient_descent(x, cand, units, grads_of, per_example, lr, threshold, max_steps, failed)
    return _halving(x, cand, units, grads_of, per_example, (method == "one_shot"), failed)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: which rows of ``x`` hold only finite values (integer inputs always do)."""
    if not (x.is_floating_point() or x.is_complex()):
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x).reshape(x.shape[0], -1).all(1)


def _finite_over(g: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Bool ``[U]``: whether each unit's gradient is finite over its candidates."""
    return torch.where(alive, torch.isfinite(g), True).all(-1)


def _pass(x, alpha, todo, grads_of, per_row: bool):
    """Gradients ``[U, T]`` for the units in ``todo`` (NaN for the others) and the number of passes."""
    if todo.shape[0] == 1 and bool(todo[0]):  # one unit (batch mode, or one row): nothing to pick or scatter
        sub, passes = _grads_grouped(x, alpha, grads_of, per_row)
        return sub.float(), passes
    g = torch.full(alpha.shape, math.nan, dtype=torch.float32, device=alpha.device)
    idx = torch.nonzero(todo).flatten()
    if idx.numel() == 0:
        return g, 0
    sub, passes = _grads_grouped(x[idx.to(x.device)] if per_row else x, alpha[idx], grads_of, per_row)
    g[idx] = sub.float()
    return g, passes


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


def _halving(x, cand, units, grads_of, per_row: bool, one_shot: bool, failed: torch.Tensor,
             stop_at: int = 1) -> TaskInference:
    """Binary search (or one pass, ``one_shot``); with ``stop_at > 1`` it stops once at most ``stop_at``
    candidates survive and leaves them in ``result.candidates`` (every unit the same number; a failed unit's
    are its first ones) and the failed units in ``result.failed``."""
    alive = cand.unsqueeze(0).expand(units, -1).clone()
    failed = failed.clone()
    ids = alive.float().argmax(-1)  # a single candidate needs no pass
    conf = torch.ones(units, device=cand.device)
    result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0))
    n = int(cand.sum())
    inf = torch.tensor(math.inf, device=cand.device)
    # every pass halves each live unit's survivors (rounding up): ceil(log2 n) passes end every search,
    # whatever the gradients hold; a unit with a non-finite gradient leaves the search
    for _ in range(0 if n <= stop_at else 1 if one_shot else math.ceil(math.log2(n))):
        todo = ~failed & (alive.sum(-1) > stop_at)
        if not bool(todo.any()):
            break
        alpha = _uniform(alive)
        g, passes = _pass(x, alpha, todo, grads_of, per_row)
        result.passes += passes
        result.alphas.append(alpha)
        result.grads.append(g)
        live = todo & _finite_over(g, alive)
        failed |= todo & ~live
        g_live = torch.where(live.unsqueeze(1) & alive, g, 0.0)
        conf = torch.where(live, belief(g_live, alive).max(-1).values, conf)
        masked = torch.where(alive, g_live, inf)  # finite on the survivors, so they sort before the rest
        if one_shot:
            ids = torch.where(live, masked.argmin(-1), ids)  # first minimum: ties go to the lower task id
            break
        # keep the ceil(n/2) lowest gradients of each unit's survivors; stable sort -> lower id first
        order = torch.sort(masked, dim=-1, stable=True).indices
        keep = (alive.sum(-1) + 1) // 2
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        alive = torch.where(live.unsqueeze(1), alive & (rank < keep.unsqueeze(1)), alive)
        ids = torch.where(live, alive.float().argmax(-1), ids)
    if stop_at > 1:
        count = n
        while count > stop_at:
            count = (count + 1) // 2  # what every live unit kept
        first = torch.cumsum(cand.long(), 0) <= count  # a failed unit's stand-ins: its first candidates
        alive = torch.where(failed.unsqueeze(1), (cand & first).unsqueeze(0), alive)
        result.candidates = _survivors(alive)
        result._failed = failed  # for the shortlist: which units got no finite gradient
        return result
    if not one_shot and bool((~failed & (alive.sum(-1) != 1)).any()):  # pragma: no cover - a broken invariant
        raise SupsupError("binary search did not end with one task per unit")
    result.task_ids = torch.where(failed, NO_TASK, ids).to(torch.int64)
    result.confidence = torch.where(failed, 0.0, conf.clamp(0.0, 1.0))
    return result


def _real(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise SupsupError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _survivors(alive: torch.Tensor) -> torch.Tensor:
    """int64 ``[U, C]``: each unit's ``True`` task ids, ascending (every unit has ``C`` of them)."""
    counts = alive.sum(-1)
    if not bool((counts == counts[0]).all()):  # halving keeps ceil(n/2) of the same n in every unit
        raise SupsupError("internal: units kept different numbers of candidates")
    return torch.nonzero(alive)[:, 1].reshape(alive.shape[0], int(counts[0]))


def _shortlist(model, x, cand, units, grads_of, per_row, value_fn, size, by, first_rows, chunk_elements, failed):
    def scores_of(xs, survivors):
        return candidate_scores(model, xs, survivors, value_fn, per_example=per_row, chunk_elements=chunk_elements)

    everyone = _survivors(cand.unsqueeze(0).expand(units, -1))
    if bool(failed.all()):  # nothing finite to score
        return TaskInference(task_ids=torch.full((units,), NO_TASK, dtype=torch.int64, device=cand.device),
                             confidence=torch.zeros(units, device=cand.device))
    if int(cand.sum()) <= size:  # short enough already
        result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0), candidates=everyone)
    elif by == "rows":
        result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0), candidates=everyone)
        if not per_row and first_rows < x.shape[0]:  # narrow on the first rows, decide on all of them
            pre = scores_of(x[:first_rows], everyone)
            keep = torch.sort(pre, dim=-1, stable=True).indices[:, :size]  # ties: the lower task id
            result.candidates = everyone.gather(1, torch.sort(keep, dim=-1).values)
    elif by == "one_shot":
        result = _halving(x, cand, units, grads_of, per_row, True, failed)
        failed = failed | (result.task_ids == NO_TASK)
        g = result.grads[-1] if result.grads else torch.zeros(units, cand.shape[0], device=cand.device)
        g = torch.where(failed.unsqueeze(1), 0.0, g)  # a failed unit: its first candidates
        g = torch.where(cand, g, torch.tensor(math.inf, device=cand.device))
        lowest = torch.sort(g, dim=-1, stable=True).indices[:, :size]  # ties: the lower task id
        result.candidates = torch.sort(lowest, dim=-1).values
    else:
        result = _halving(x, cand, units, grads_of, per_row, False, failed, stop_at=size)
        failed = result._failed
    survivors = result.candidates
    scores = scores_of(x, survivors)
    failed = failed.to(scores.device) | ~torch.isfinite(scores).all(-1)  # no score to compare: no task claimed
    best = scores.argmin(-1)  # first minimum: survivors ascend, so ties go to the lower task id
    ids = survivors.gather(1, best.unsqueeze(1)).squeeze(1).to(torch.int64)
    result.task_ids = torch.where(failed, NO_TASK, ids)
    n = 1 if per_row else x.shape[0]
    conf = torch.softmax(-n * scores.double(), dim=-1).max(-1).values.float().clamp(0.0, 1.0)
    result.confidence = torch.where(failed, 0.0, conf)
    result.scores = scores
    return result


def candidate_scores(model: nn.Module, x: torch.Tensor, candidates: torch.Tensor,
                     value_fn: Callable[[torch.Tensor], torch.Tensor], *, per_example: bool,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """``[U, C]``: each candidate task's score under its own mask alone.

    ``per_example=False``: ``candidates`` is ``[1, C]`` and a score is the mean of ``value_fn``
    over the rows of ``x``. ``per_example=True``: ``candidates`` is ``[B, C]``, row ``r`` of ``x``
    is scored under each of its own ``C`` candidates. Every (row, candidate) pair is one row of a
    single forward pass (:func:`forward_rows_through_tasks`), in chunks of bounded size.
    """
    b, c = x.shape[0], candidates.shape[1]
    if per_example:
        xs, ids = x.repeat_interleave(c, dim=0), candidates.reshape(-1)
    else:
        xs, ids = x.repeat((c,) + (1,) * (x.dim() - 1)), candidates[0].repeat_interleave(b)
    widest = max([layer.weight.shape[0] for layer in convert.masked_layers(model)
                  if isinstance(layer, MaskedLayerBase)] + [x[0].numel()])
    step = max(1, int(chunk_elements) // max(1, widest))
    with torch.no_grad():
        values = torch.cat([value_fn(forward_rows_through_tasks(model, xs[s:s + step], ids[s:s + step])).float()
                            for s in range(0, xs.shape[0], step)])
    return values.reshape(b, c) if per_example else values.reshape(c, b).mean(-1, keepdim=True).t()


def forward_rows_through_tasks(model: nn.Module, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """The model's output for every row ``i`` of ``x`` under task ``task_ids[i]``'s stored mask alone.

    An ``nn.Sequential`` whose only task modules are :class:`~supsup_fast.nn.MaskedLinear` runs once,
    every masked layer as one ``ops.masked_linear_grouped`` call (rows x tasks); any other model runs
    once per distinct task on that task's rows. The model's mode is restored afterwards.
    """
    if task_ids.shape != (x.shape[0],):
        raise SupsupError(f"task_ids must have one entry per row of x, shape [{x.shape[0]}], got {tuple(task_ids.shape)}")
    ids = task_ids.to(device=model_device(model), dtype=torch.int64)
    if isinstance(model, nn.Sequential) and all(isinstance(m, MaskedLinear) for m in model.modules()
                                                if isinstance(m, TaskModule)):
        h = x
        for m in model:
            if isinstance(m, MaskedLinear):
                if h.dim() != 2 or h.shape[0] != ids.shape[0]:
                    raise SupsupError(f"grouped forward: {type(m).__name__} got input of shape {tuple(h.shape)}, "
                                      f"expected [{ids.shape[0]}, {m.in_features}]")
                h = ops.masked_linear_grouped(h, m.weight, m.bank, ids, m.bias)
            else:
                h = m(h)
        return h
    out = None
    with preserved_mode(model):
        for t in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == t).flatten()
            convert.set_task(model, int(t))
            y = model(x[rows])
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out[rows] = y
    return out


def _gradient_descent(x, cand, units, grads_of, per_row, lr, threshold, max_steps, failed) -> TaskInference:
    threshold, lr = _real(threshold, "threshold"), _real(lr, "lr")
    if not (0.0 < threshold <= 1.0):
        raise SupsupError(f"threshold must be in (0, 1], got {threshold}")
    max_steps = _positive_int(max_steps, "max_steps")
    if not lr > 0:
        raise SupsupError(f"lr must be positive, got {lr}")
    failed = failed.clone()
    alive = cand.unsqueeze(0).expand(units, -1)
    theta = torch.zeros(alive.shape, device=cand.device)
    neg_inf = torch.tensor(-math.inf, device=cand.device)
    result = TaskInference(task_ids=torch.empty(0), confidence=torch.empty(0))
    for _ in range(max_steps):
        alpha = torch.softmax(torch.where(alive, theta, neg_inf), dim=-1)
        todo = (alpha.max(-1).values < threshold) & ~failed  # each unit stops on its own
        if not bool(todo.any()):
            break
        g, passes = _pass(x, alpha, todo, grads_of, per_row)
        result.passes += passes
        result.alphas.append(alpha)
        result.grads.append(g)
        # chain rule through the softmax, then a step of lr logits along the normalised direction
        g = torch.where(alive, g, 0.0)
        d = alpha * (g - (alpha * g).sum(-1, keepdim=True))
        d = torch.where(alive, d, 0.0)
        live = todo & torch.isfinite(d).all(-1)  # a NaN/Inf gradient (or an overflow) ends that unit's descent
        failed |= todo & ~live
        d = torch.where(live.unsqueeze(1), d, 0.0)
        scale = d.abs().amax(-1, keepdim=True)
        theta = theta - lr * d / torch.where(scale > 0, scale, 1.0)
    alpha = torch.softmax(torch.where(alive, theta, neg_inf), dim=-1)
    result.task_ids = torch.where(failed, NO_TASK, alpha.argmax(-1)).to(torch.int64)
    result.confidence = torch.where(failed, 0.0, alpha.max(-1).values.clamp(0.0, 1.0))
    return result


# ======================================================================================
# Prediction and scoring
# ======================================================================================
def predict(model: nn.Module, x: torch.Tensor, **infer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Infer the task, then classify with the inferred task's mask.

    Returns ``(task_ids [B], classes [B])``: in batch mode every row gets the batch's task. Classes
    are the argmax over all outputs (superfluous neurons included, as in the paper: the labels
    live in the real range, so a superfluous winner counts as wrong); rows without a task
    (:data:`NO_TASK`) or with non-finite outputs get class ``-1``. Takes :func:`infer_task`'s
    keyword arguments; the model's mode is restored afterwards.
    """
    with model_in_use(model):
        inf = infer_task(model, x, **infer_kwargs)
        ids = inf.task_ids.to(x.device)
        if ids.numel() == 1:
            ids = ids.expand(x.shape[0])
        return ids.clone(), classify(model, x, ids, logits_fn=infer_kwargs.get("logits_fn"))


def classify(model: nn.Module, x: torch.Tensor, task_ids: torch.Tensor,
             logits_fn: Optional[Callable] = None) -> torch.Tensor:
    """Classes of every row of ``x`` with its task's mask (``task_ids [B]``): the argmax over all
    outputs, superfluous neurons included; ``-1`` for rows whose id is :data:`NO_TASK` or whose
    outputs are not all finite. The model runs in ``eval()`` mode; its modes are restored afterwards."""
    classes = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
    for rows, y in _outputs_by_task(model, x, task_ids, logits_fn):
        finite = torch.isfinite(y).reshape(y.shape[0], -1).all(1)  # the argmax of NaN outputs is no class
        classes[rows] = torch.where(finite, y.argmax(-1), -1)
    return classes


def task_logits(model: nn.Module, x: torch.Tensor, task_ids: torch.Tensor,
                logits_fn: Optional[Callable] = None) -> torch.Tensor:
    """The model's logits (:func:`model_logits`) with every row's own task (``task_ids [B]``): GG inference
    with a task per row, without gradients. Rows whose id is :data:`NO_TASK` are NaN. The model runs in
    ``eval()`` mode; its modes are restored afterwards. Safe to call from threads sharing the model."""
    out = None
    for rows, y in _outputs_by_task(model, x, task_ids, logits_fn, all_rows_if_none=True):
        if out is None:
            out = y.new_full((x.shape[0],) + tuple(y.shape[1:]), math.nan)
        out[rows] = y
    return out


def _row_task_ids(model: nn.Module, x: torch.Tensor, task_ids) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise SupsupError(f"x must be a batch tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if (not isinstance(task_ids, torch.Tensor) or task_ids.dtype == torch.bool or task_ids.is_floating_point()
            or task_ids.is_complex() or task_ids.shape != (x.shape[0],)):
        raise SupsupError(f"task_ids must be an integer tensor of shape [{x.shape[0]}] (one task per row), got "
                          f"{getattr(task_ids, 'dtype', type(task_ids).__name__)} "
                          f"{tuple(getattr(task_ids, 'shape', ()))}")
    t = _learned_tasks(model)
    ids = task_ids.to(device=x.device, dtype=torch.int64)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < NO_TASK or hi >= t:
            raise SupsupError(f"task_ids must be learned task ids in 0..{t - 1} (or NO_TASK={NO_TASK}), "
                              f"got min {lo}, max {hi}")
    return ids


def _outputs_by_task(model, x, task_ids, logits_fn: Optional[Callable] = None, all_rows_if_none: bool = False) -> list:
    """``(rows, logits of model(x[rows]))`` for every task among ``task_ids`` (one forward per task), computed
    with the model held by this thread, in ``eval()`` mode, without gradients."""
    ids = _row_task_ids(model, x, task_ids)
    out = []
    with model_in_use(model), eval_mode(model), preserved_mode(model), torch.no_grad():
        tasks = [t for t in torch.unique(ids).tolist() if t != NO_TASK]
        if not tasks and all_rows_if_none:  # one row run only for the output's shape: every row stays NaN
            if x.shape[0] == 0:
                raise SupsupError("task_logits needs at least one row")
            convert.set_task(model, 0)
            return [(torch.zeros_like(ids, dtype=torch.bool), model_logits(model(x[:1]), logits_fn)[:0])]
        for t in tasks:
            rows = ids == t
            convert.set_task(model, int(t))
            out.append((rows, model_logits(model(x[rows]), logits_fn)))
    return out


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
