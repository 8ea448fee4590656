"""Model surgery: turn an ordinary network into a SupSup network in place, and drive its tasks.

:func:`convert_` swaps, like torchao's ``quantize_``:

* ``nn.Linear`` -> :class:`~supsup_fast.nn.MaskedLinear`, ``nn.Conv2d`` ->
  :class:`~supsup_fast.nn.MaskedConv2d`, each with ``layer_id = layer_id_for(fqn)`` so the
  signed-constant base is a function of (seed, module name) alone;
* ``nn.BatchNorm1d/2d/3d`` -> :class:`~supsup_fast.nn.TaskBatchNorm` when ``config.per_task_norm``.

What is deliberately **not** converted: the projections inside ``nn.MultiheadAttention``.
``MultiheadAttention.forward`` hands ``in_proj_weight`` and ``out_proj.weight`` straight to
``F.multi_head_attention_forward`` (and its fused fast path) instead of calling ``out_proj``,
so a masked ``out_proj`` would be bypassed silently. Attention projections therefore stay dense
(pretrained or however they were initialised) and untouched; in an ``nn.TransformerEncoderLayer``
the feed-forward ``linear1`` / ``linear2`` are masked (and the layer's fused inference fast
path, which would read their unmasked base weights, is switched off). Other modules (LayerNorm, embeddings) are
left as they are; :func:`task_parameters` returns only the mask scores, the one thing to train.

The helpers below apply the task protocol (:mod:`supsup_fast.nn.base`) to every SupSup layer of
a model at once and check that all layers agree on the number of tasks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .base_weights import (
    layer_id_for,  # the id convert_ gives a layer: CRC-32 of its qualified name
)
from .config import ERDOS_RENYI_CAP, SupsupConfig
from .errors import SupsupError
from .nn import MaskedConv2d, MaskedLayerBase, MaskedLinear, TaskBatchNorm
from .nn._model import masked_modules, task_modules
from .nn.base import TaskModule

FilterFn = Callable[[nn.Module, str], bool]
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _convert_one(module: nn.Module, fqn: str, config: SupsupConfig) -> Optional[nn.Module]:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise SupsupError(f"convert_: '{fqn}' is a lazy module that has not been initialised; run one "
                              "forward pass first")
        cls = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
        return cls.from_module(module, config, layer_id_for(fqn))
    if config.per_task_norm and isinstance(module, _BATCHNORMS):
        return TaskBatchNorm.from_module(module, keep_affine=config.base == "pretrained", max_tasks=config.max_tasks)
    return None


def convert_(model: nn.Module, config: Optional[SupsupConfig] = None,
             filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swap ``model``'s Linear / Conv2d (and BatchNorm) layers for SupSup layers, in place.

    Args:
        model: the network; its root must be a container (a bare ``nn.Linear`` cannot be
            replaced in place: use ``MaskedLinear.from_module``).
        config: how masks are learned and stored (default ``SupsupConfig()``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` chooses which candidate modules are
            swapped (default: all). Children of ``nn.MultiheadAttention`` are never swapped.

    Returns:
        ``model``, converted. Layers already converted are left alone, so calling it twice is safe.
    """
    config = SupsupConfig() if config is None else config
    if not isinstance(config, SupsupConfig):
        raise SupsupError(f"convert_: config must be a SupsupConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise SupsupError(f"convert_: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, nn.Conv2d) + _BATCHNORMS):
        raise SupsupError(f"convert_: the model itself is a {type(model).__name__} and cannot be replaced in "
                          "place; wrap it in a container or use the layer's from_module")
    swapped: dict[int, nn.Module] = {}  # shared (tied) modules stay shared
    for parent_fqn, parent in list(model.named_modules()):
        if isinstance(parent, (nn.MultiheadAttention, TaskModule)):
            continue
        for name, child in list(parent._modules.items()):  # every name, also of a module held twice
            if child is None:
                continue
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            new = swapped.get(id(child))
            if new is None:
                if filter_fn is not None and not filter_fn(child, fqn):
                    continue
                new = _convert_one(child, fqn, config)
                if new is None:
                    continue
                new.train(child.training)
                swapped[id(child)] = new
            setattr(parent, name, new)
    _disable_fused_transformer_paths(model)
    new_masked = [m for m in swapped.values() if isinstance(m, MaskedLayerBase)]
    if config.density_schedule == "erdos_renyi" and new_masked:
        for layer, d in zip(new_masked, erdos_renyi_densities(new_masked, config.density, config.erdos_renyi_scale)):
            layer.density = d
    return model


def _disable_fused_transformer_paths(model: nn.Module) -> None:
    """Keep PyTorch's fused transformer kernels away from masked feed-forward layers.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder`` with a padding
    mask) may call a fused kernel that reads ``linear1.weight`` / ``linear2.weight`` directly,
    which would apply the unmasked base weight. The flags below are the ones those fast paths
    test; clearing them selects the ordinary module-by-module path.
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
            isinstance(getattr(m, n, None), TaskModule) for n in ("linear1", "linear2", "norm1", "norm2")
        ):
            m.activation_relu_or_gelu = 0
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(c, TaskModule) for c in m.layers.modules()):
            m.use_nested_tensor = False


def erdos_renyi_densities(layers, density: float, scale: Optional[float] = None) -> list[float]:
    """Per-layer kept fractions ``min(0.5, scale * (c_out + c_in) / (c_out c_in kh kw))``.

    With ``scale=None`` the scale is solved (by bisection; the overall density is monotone in it)
    so that the layers together keep a ``density`` fraction of their weights.
    """
    shapes = [tuple(layer.weight.shape) for layer in layers]
    sizes = [float(torch.Size(s).numel()) for s in shapes]
    raw = [(s[0] + s[1]) / n for s, n in zip(shapes, sizes)]  # conv: s[1] = in_channels / groups

    def densities(sc: float) -> list[float]:
        return [min(ERDOS_RENYI_CAP, sc * r) for r in raw]

    if scale is not None:
        return densities(float(scale))
    if density > ERDOS_RENYI_CAP:
        raise SupsupError(f"an Erdős–Rényi budget caps each layer at {ERDOS_RENYI_CAP}; overall density {density} "
                          "cannot be met")
    total = sum(sizes)

    def overall(sc: float) -> float:
        return sum(d * n for d, n in zip(densities(sc), sizes)) / total

    lo, hi = 0.0, ERDOS_RENYI_CAP / min(raw)  # at `hi` every layer sits at the cap
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overall(mid) < density else (lo, mid)
    return densities(hi)


# ---------------------------------------------------------------------------------------------
# Driving every SupSup layer of a model
# ---------------------------------------------------------------------------------------------
def masked_layers(model: nn.Module) -> list[TaskModule]:
    """Every task module of ``model`` -- :class:`MaskedLayerBase` layers *and* :class:`TaskBatchNorm`
    norms -- in module order: :func:`supsup_fast.nn.task_modules` under its former name."""
    return task_modules(model)


def _layers(model: nn.Module) -> list[TaskModule]:
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


def begin_task(model: nn.Module, task: Optional[int] = None) -> int:
    """Open a new task (or reopen frozen ``task``) in every layer; returns its id."""
    layers = _layers(model)
    num_tasks(model)
    if any(m.in_training for m in layers):
        raise SupsupError("begin_task: a task is still in training; call freeze_task(model) first")
    return _same([m.begin_task(task) for m in layers], "begin_task")


def freeze_task(model: nn.Module) -> int:
    """Store the task in training in every layer (bits, statistics); returns its id."""
    layers = _layers(model)
    missing = [n for n, m in model.named_modules() if isinstance(m, TaskModule) and not m.in_training]
    if missing:
        raise SupsupError(f"freeze_task without begin_task: no task is in training in {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
    return _same([m.freeze_task() for m in layers], "freeze_task")


def set_task(model: nn.Module, t: int) -> None:
    """Apply task ``t`` everywhere (a frozen task, or the one in training)."""
    layers = _layers(model)
    num_tasks(model)
    for m in layers:
        m.set_task(t)


def set_superposition(model: nn.Module, alpha: Optional[torch.Tensor] = None,
                      requires_grad: bool = False) -> torch.Tensor:
    """Mix all frozen tasks with ``alpha`` in every layer; returns the (shared) alpha tensor.

    ``alpha=None`` means uniform ``1/T`` over the ``T`` learned tasks (float32, on the model's
    device). With ``requires_grad=True`` the returned alpha is a leaf requiring grad, so one
    backward pass yields ``d loss / d alpha`` summed over every layer.
    """
    layers = _layers(model)
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


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scores of the task in training: the parameters to hand to an optimizer."""
    return [m.scores for m in masked_modules(model) if m.scores is not None]


def mask_nbytes(model: nn.Module) -> int:
    """Bytes of stored mask bits over all masked layers (``sum T * N * ceil(K/32) * 4``)."""
    return sum(m.mask_nbytes() for m in masked_modules(model))
