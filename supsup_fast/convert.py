"""Model surgery: turn an ordinary network into a SupSup network in place, and back.

:func:`convert_` swaps, like torchao's ``quantize_``:

* ``nn.Linear`` -> :class:`~supsup_fast.nn.MaskedLinear`, ``nn.Conv2d`` ->
  :class:`~supsup_fast.nn.MaskedConv2d`, each with ``layer_id = layer_id_for(fqn)`` so the
  signed-constant base is a function of (seed, module name) alone;
* Hugging Face ``transformers.Conv1D`` (GPT-2's projections: ``y = x W + b`` with ``W`` stored
  ``[in, out]``) -> :class:`~supsup_fast.nn.MaskedLinear` over ``W^T``, the same function;
* ``nn.BatchNorm1d/2d/3d`` -> :class:`~supsup_fast.nn.TaskBatchNorm` when ``config.per_task_norm``;
  timm's ``BatchNormAct2d`` -> :class:`~supsup_fast.nn.TaskBatchNormAct` (its activation kept);
* timm's ``Conv2dSame`` -> :class:`~supsup_fast.nn.SamePadConv2d` (its dynamic padding kept); timm's
  ``Linear`` (the same function as ``nn.Linear`` outside TorchScript) -> :class:`~supsup_fast.nn.MaskedLinear`;
* every module named in ``modules_to_save`` -> :class:`~supsup_fast.nn.TaskDense`: left dense, with
  its weights learned and kept per task (peft's ``modules_to_save``).

It never changes what a module computes without saying so:

* a subclass of ``nn.Linear`` / ``nn.Conv2d`` / a BatchNorm whose ``forward`` differs from its base
  class's is refused, naming the module and its class, unless a handler is registered for the class
  (:func:`register_conversion`);
* a weight that is a tensor subclass (quantized, sharded, ...) or not floating is refused;
* a layer whose weight is tied to a module that stays dense (GPT-2's ``lm_head`` and ``wte``) stays
  dense too, so the tie holds;
* a model with nothing to mask is refused; modules with weights left dense are listed in one
  :class:`~supsup_fast.errors.ConversionWarning`, and :func:`summary` tells what was done;
* a model converted with one config is not converted again with another.

What is deliberately **not** converted: the projections inside ``nn.MultiheadAttention``, whose
``forward`` hands ``in_proj_weight`` and ``out_proj.weight`` straight to
``F.multi_head_attention_forward``, so a masked ``out_proj`` would be bypassed. In an
``nn.TransformerEncoderLayer`` the feed-forward ``linear1`` / ``linear2`` are masked (and the
layer's fused inference fast path, which would read their unmasked base weights, is switched off).

Everything that is not a task's mask is frozen (``requires_grad=False``) by default, as peft does:
:func:`~supsup_fast.model_tasks.task_parameters` is what trains. :func:`merge_task` folds a task's masks
into a plain ``torch.nn`` copy of the model, :func:`unconvert` turns the model back in place.
The task helpers (``begin_task``, ``set_task``, ...) live in :mod:`supsup_fast.model_tasks` and are
re-exported here under their old paths.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .base_weights import (
    layer_id_for,  # the id convert_ gives a layer: CRC-32 of its qualified name
)
from .config import ERDOS_RENYI_CAP, SupsupConfig
from .errors import ConversionWarning, SupsupError
from .model_tasks import (  # noqa: F401  (their former home: convert.begin_task etc. keep working)
    _layers,
    begin_task,
    delete_task,
    discard_task,
    freeze_task,
    mask_nbytes,
    num_tasks,
    recalibrate_norms,
    rename_task,
    set_row_tasks,
    set_superposition,
    set_task,
    task_id,
    task_parameters,
    tasks,
)
from .nn import (
    MaskedConv2d,
    MaskedLayerBase,
    MaskedLinear,
    SamePadConv2d,
    TaskBatchNorm,
    TaskBatchNormAct,
    TaskDense,
)
from .nn._model import masked_modules, task_modules
from .nn.base import TaskModule
from .nn.record import ATTR, ModelRecord, find_record, record_of

FilterFn = Callable[[nn.Module, str], bool]
#: ``handler(module, fqn, config) -> replacement`` for one class (see :func:`register_conversion`).
Handler = Callable[[nn.Module, str, SupsupConfig], nn.Module]
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_DENSE_ATTR = "_supsup_dense"  # a converted module's original, its tensors on the meta device


# ---------------------------------------------------------------------------------------------
# How each kind of module is converted
# ---------------------------------------------------------------------------------------------
def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_HANDLERS: dict[str, Handler] = {}


def register_conversion(target: Union[type, str]):
    """Register ``handler(module, fqn, config) -> nn.Module`` for a class (or its ``"module.QualName"``, so the
    class's library need not be imported): ``convert_`` then swaps its instances for what the handler returns.
    Subclasses are handled too as long as they do not override ``forward``."""
    key = target if isinstance(target, str) else _qualname(target)

    def deco(fn: Handler) -> Handler:
        _HANDLERS[key] = fn
        return fn

    return deco


def _find_handler(cls: type) -> Optional[Handler]:
    for base in cls.__mro__:
        fn = _HANDLERS.get(_qualname(base))
        if fn is not None:
            return fn if base is cls or cls.forward is base.forward else None
    return None


# the torch layers swapped by default, and the methods whose override means "computes something else"
_TORCH_LAYERS = ((nn.Linear, ("forward",)), (nn.Conv2d, ("forward", "_conv_forward")), (_BATCHNORM, ("forward",)))


def _torch_base(module: nn.Module) -> Optional[tuple[type, list[str]]]:
    """The torch layer ``module`` is an instance of, and the methods of it its class overrides."""
    for base, methods in _TORCH_LAYERS:
        if isinstance(module, base):
            if base is _BATCHNORM and not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                ref = nn.BatchNorm2d
            else:
                ref = base
            return ref, [m for m in methods if getattr(type(module), m) is not getattr(ref, m)]
    return None


def _check_weight(module: nn.Module, fqn: str, names: Sequence[str] = ("weight",)) -> None:
    for name in names:
        w = getattr(module, name, None)
        if w is None:
            continue
        if isinstance(w, nn.parameter.UninitializedTensorMixin):
            raise SupsupError(f"convert_: '{fqn}' is a lazy module that has not been initialised; run one "
                              "forward pass first")
        if type(w) not in (torch.Tensor, nn.Parameter):
            raise SupsupError(f"convert_: '{fqn}' ({_qualname(type(module))}) holds its {name} as a "
                              f"{type(w).__name__}, a tensor subclass (quantized, sharded, ...) whose values a "
                              "mask cannot select; convert the model before quantizing or sharding it, or exclude "
                              "this module with filter_fn")
        if not w.is_floating_point():
            raise SupsupError(f"convert_: '{fqn}' ({_qualname(type(module))}) has a {w.dtype} {name}; masks "
                              "select from floating weights only")


def _keep_bias(module: nn.Module, config: SupsupConfig) -> bool:
    return bool(config.keep_bias) and getattr(module, "bias", None) is not None


def _linear(module: nn.Linear, fqn: str, config: SupsupConfig) -> nn.Module:
    return MaskedLinear.from_module(module, config, layer_id_for(fqn))


def _conv2d(module: nn.Conv2d, fqn: str, config: SupsupConfig) -> nn.Module:
    return MaskedConv2d.from_module(module, config, layer_id_for(fqn))


def _batchnorm(module, fqn: str, config: SupsupConfig) -> nn.Module:
    pretrained = config.base == "pretrained"
    return TaskBatchNorm.from_module(module, keep_affine=pretrained, max_tasks=config.max_tasks,
                                     keep_stats=pretrained)


@register_conversion("transformers.pytorch_utils.Conv1D")
def _hf_conv1d(module: nn.Module, fqn: str, config: SupsupConfig) -> nn.Module:
    """``y = x W + b`` with ``W [in, out]`` (GPT-2): a MaskedLinear over ``W^T``, the same function."""
    w = module.weight
    keep = _keep_bias(module, config)
    layer = MaskedLinear(
        w.shape[0], w.shape[1], bias=keep, config=config, layer_id=layer_id_for(fqn),
        weight=w.detach().t() if config.base == "pretrained" else None,
        bias_value=module.bias if keep else None, dtype=w.dtype, device=w.device,
    )
    layer.__dict__["_supsup_transposed"] = True
    return layer


@register_conversion("timm.layers.linear.Linear")
def _timm_linear(module: nn.Linear, fqn: str, config: SupsupConfig) -> nn.Module:
    """timm's Linear (MobileNetV3's classifier) differs from nn.Linear only under TorchScript (it casts the
    weight to the input's dtype there): in eager mode the same function."""
    return _linear(module, fqn, config)


@register_conversion("timm.layers.norm_act.BatchNormAct2d")
def _timm_bn_act(module: nn.Module, fqn: str, config: SupsupConfig) -> nn.Module:
    """timm's BatchNorm + dropout + activation: per-task statistics, then the same ``drop`` and ``act``."""
    pretrained = config.base == "pretrained"
    return TaskBatchNormAct.from_module(module, keep_affine=pretrained, max_tasks=config.max_tasks,
                                        keep_stats=pretrained, drop=module.drop, act=module.act)


@register_conversion("timm.layers.conv2d_same.Conv2dSame")
def _timm_conv2d_same(module: nn.Conv2d, fqn: str, config: SupsupConfig) -> nn.Module:
    """timm's TensorFlow-"same" conv: the same dynamic padding, then a masked conv without padding."""
    if tuple(module.padding) != (0, 0) or module.padding_mode != "zeros":
        raise SupsupError(f"convert_: '{fqn}' ({_qualname(type(module))}) has padding={module.padding}, "
                          f"padding_mode={module.padding_mode!r}; its dynamic 'same' padding is handled for "
                          "padding=0 and zero padding only")
    keep = _keep_bias(module, config)
    conv = MaskedConv2d(
        module.in_channels, module.out_channels, module.kernel_size, module.stride, 0, module.dilation,
        module.groups, bias=keep, config=config, layer_id=layer_id_for(fqn),
        weight=module.weight if config.base == "pretrained" else None,
        bias_value=module.bias if keep else None, dtype=module.weight.dtype, device=module.weight.device,
    )
    return SamePadConv2d(conv)


# ---------------------------------------------------------------------------------------------
# convert_
# ---------------------------------------------------------------------------------------------
def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose own tensors are on the meta device (no memory): what merge_task and unconvert
    fill in. Its children (an activation, a dropout) are real copies."""
    memo: dict = {}
    for d in (module._parameters, module._buffers):
        for v in d.values():
            if v is not None:
                meta = torch.empty_like(v, device="meta")
                memo[id(v)] = nn.Parameter(meta, v.requires_grad) if isinstance(v, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _is_unit(m: nn.Module) -> bool:
    return _DENSE_ATTR in m.__dict__ or isinstance(m, TaskModule)


@dataclass
class _Plan:
    fqn: str
    make: Callable[[], nn.Module]
    masks: bool  # becomes a masked layer (its weight may be tied)


def _plan_one(module: nn.Module, fqn: str, config: SupsupConfig) -> Union[_Plan, str, None]:
    """How ``module`` is converted: a plan, a reason it stays dense (str), or ``None`` (nothing to say)."""
    cls = type(module)
    handler = _find_handler(cls)
    if handler is not None:
        is_norm = isinstance(module, _BATCHNORM)
        if is_norm and not config.per_task_norm:
            return "per_task_norm=False: its statistics are shared by every task"
        _check_weight(module, fqn)
        return _Plan(fqn, lambda: handler(module, fqn, config), masks=not is_norm)
    base = _torch_base(module)
    if base is None:
        return None
    ref, overridden = base
    if overridden:
        raise SupsupError(
            f"convert_: '{fqn}' is a {_qualname(cls)}, a subclass of {_qualname(ref)} that overrides "
            f"{', '.join(overridden)}: swapping it for a SupSup layer would change what it computes. Exclude it "
            "with filter_fn, or register how to convert it with supsup_fast.register_conversion"
        )
    if isinstance(module, _BATCHNORM):
        if not config.per_task_norm:
            return "per_task_norm=False: its statistics are shared by every task"
        _check_weight(module, fqn, ("weight", "running_mean"))
        return _Plan(fqn, lambda: _batchnorm(module, fqn, config), masks=False)
    _check_weight(module, fqn)
    make = _linear if isinstance(module, nn.Linear) else _conv2d
    return _Plan(fqn, lambda: make(module, fqn, config), masks=True)


def _match(names: Sequence[str], fqn: str) -> Optional[str]:
    """The entry of ``names`` that ``fqn`` matches: equal, or its last dotted components (peft's rule)."""
    for n in names:
        if fqn == n or fqn.endswith("." + n):
            return n
    return None


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter) -> [(module name, module)]`` of every module holding it directly (ties show as 2+)."""
    out: dict[int, list] = {}
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                out.setdefault(id(p), []).append((name, m))
    return out


def convert_(model: nn.Module, config: Optional[SupsupConfig] = None, filter_fn: Optional[FilterFn] = None, *,
             modules_to_save: Optional[Sequence[str]] = None, freeze: bool = True) -> nn.Module:
    """Swap ``model``'s layers for SupSup layers, in place (see the module docstring for what is swapped).

    Args:
        model: the network; its root must be a container (a bare ``nn.Linear`` cannot be
            replaced in place: use ``MaskedLinear.from_module``).
        config: how masks are learned and stored (default ``SupsupConfig()``; for a model converted before,
            the config it was converted with, and no other).
        filter_fn: ``filter_fn(module, fqn) -> bool`` chooses which candidate modules are
            swapped (default: all). Children of ``nn.MultiheadAttention`` are never swapped.
        modules_to_save: names of dense modules (a head, a norm) whose weights every task learns and keeps for
            itself; a name matches a module whose qualified name is it or ends with ``"." + name``.
        freeze: freeze (``requires_grad=False``) every parameter that is not a task's: then only
            :func:`task_parameters` can train (default ``True``; :func:`unconvert` restores the flags).

    Returns:
        ``model``, converted. Calling it again with the same config converts what the first call left
        (already converted layers stay as they are); a different config is refused.
    """
    if not isinstance(model, nn.Module):
        raise SupsupError(f"convert_: model must be an nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, SupsupConfig):
        raise SupsupError(f"convert_: config must be a SupsupConfig, got {type(config).__name__}")
    if isinstance(model, (nn.Linear, nn.Conv2d, _BATCHNORM)) or _is_unit(model):
        raise SupsupError(f"convert_: the model itself is a {type(model).__name__} and cannot be replaced in "
                          "place; wrap it in a container or use the layer's from_module")
    config = _config_for(model, config)
    trainable_before = [n for n, p in model.named_parameters() if p.requires_grad]
    save = list(modules_to_save or [])
    if isinstance(modules_to_save, str):
        raise SupsupError("convert_: modules_to_save must be a list of module names, not one string")

    holders = _holders(model)
    plans: dict[int, _Plan] = {}
    sites: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, child) for every swap
    dense_reason: dict[str, str] = {}
    matched = set()
    for parent_fqn, parent in list(model.named_modules()):
        if isinstance(parent, nn.MultiheadAttention) or _is_unit(parent) or _inside_unit(parent_fqn, model):
            continue
        for name, child in list(parent._modules.items()):  # every name, also of a module held twice
            if child is None or _is_unit(child):
                continue
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if id(child) in plans:
                sites.append((parent, name, child))
                continue
            hit = _match(save, fqn)
            if hit is not None:
                matched.add(hit)
                plans[id(child)] = _Plan(fqn, lambda child=child, fqn=fqn: _task_dense(child, fqn, config),
                                         masks=False)
                sites.append((parent, name, child))
                continue
            if filter_fn is not None and not filter_fn(child, fqn):
                dense_reason[fqn] = "excluded by filter_fn"
                continue
            plan = _plan_one(child, fqn, config)
            if isinstance(plan, str):
                dense_reason[fqn] = plan
            elif plan is not None:
                plans[id(child)] = plan
                sites.append((parent, name, child))
    missing = [n for n in save if n not in matched]
    if missing:
        raise SupsupError(f"convert_: modules_to_save names {missing}, which match no module of "
                          f"{type(model).__name__} (not yet converted)")

    # a masked layer whose weight is tied to a module that stays dense would break the tie: it stays dense
    changing = {id(c) for c in (s[2] for s in sites) if plans[id(c)].masks}
    for cid in list(changing):
        child = next(s[2] for s in sites if id(s[2]) == cid)
        w = getattr(child, "weight", None)
        others = [(n, m) for n, m in holders.get(id(w), []) if m is not child and id(m) not in changing]
        if others:
            n, m = others[0]
            dense_reason[plans[cid].fqn] = f"its weight is tied to '{n}' ({type(m).__name__}), which stays dense"
            del plans[cid]
    sites = [s for s in sites if id(s[2]) in plans]

    if not sites and not task_modules(model):
        raise SupsupError(_nothing_to_convert(model, dense_reason))
    if not any(p.masks for p in plans.values()) and not masked_modules(model):
        raise SupsupError(_nothing_to_convert(model, dense_reason))

    rec = record_of(model)  # only now: a refused model is left exactly as it was
    if rec.config is None:
        rec.config = config
        rec.trainable = trainable_before
    swapped: dict[int, nn.Module] = {}
    for parent, name, child in sites:
        new = swapped.get(id(child))
        if new is None:
            plan = plans[id(child)]
            skeleton = _skeleton(child) if not isinstance(child, TaskModule) else None
            new = plan.make()
            if skeleton is not None and not isinstance(new, TaskDense):
                new.__dict__[_DENSE_ATTR] = skeleton
            new.train(child.training)
            swapped[id(child)] = new
            rec.converted[plan.fqn] = _qualname(type(child))
            if isinstance(new, TaskDense):
                rec.modules_to_save.append(plan.fqn)
            elif getattr(child, "bias", None) is not None and _bias_dropped(new):
                rec.biases_dropped.append(plan.fqn)
        setattr(parent, name, new)
    for fqn in list(rec.dense):
        if fqn in rec.converted:
            del rec.dense[fqn]
    rec.dense.update(dense_reason)

    _disable_fused_transformer_paths(model, rec)
    new_masked = [m for m in swapped.values() if isinstance(m, MaskedLayerBase)]
    new_masked += [m.conv for m in swapped.values() if isinstance(m, SamePadConv2d)]
    if config.density_schedule == "erdos_renyi" and new_masked:
        for layer, d in zip(new_masked, erdos_renyi_densities(new_masked, config.density, config.erdos_renyi_scale)):
            layer.density = d
    if freeze:
        inside = {id(p) for m in task_modules(model) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(False)
    _warn_dense(model, rec, freeze)
    return model


def _config_for(model: nn.Module, config: Optional[SupsupConfig]) -> SupsupConfig:
    """The config to convert with: the given one, unless the model was converted with another before."""
    rec = find_record(model)
    prev = rec.config if rec is not None and rec.config is not None else \
        next((m.config for m in masked_modules(model)), None)
    if prev is None:
        return SupsupConfig() if config is None else config
    if config is not None and config != prev:
        raise SupsupError(
            f"convert_: the model is already converted with {prev}; converting it again with {config} would "
            "leave its SupSup layers under the first config. Pass the same config (or none) to convert the rest, "
            "or unconvert(model) first"
        )
    return prev


def _inside_unit(fqn: str, model: nn.Module) -> bool:
    parts = fqn.split(".") if fqn else []
    m = model
    for p in parts[:-1]:
        m = m._modules.get(p)
        if m is None:
            return False
        if _is_unit(m):
            return True
    return False


def _task_dense(module: nn.Module, fqn: str, config: SupsupConfig) -> TaskDense:
    if any(isinstance(m, TaskModule) for m in module.modules()):
        raise SupsupError(f"convert_: modules_to_save '{fqn}' holds SupSup layers; name a dense module")
    if not any(p.is_floating_point() for p in module.parameters()):
        raise SupsupError(f"convert_: modules_to_save '{fqn}' ({type(module).__name__}) has no weights to learn")
    for n, p in module.named_parameters():
        if type(p) not in (torch.Tensor, nn.Parameter):
            raise SupsupError(f"convert_: modules_to_save '{fqn}' holds {n} as a {type(p).__name__}, a tensor "
                              "subclass; it cannot be kept per task")
    return TaskDense(module, max_tasks=config.max_tasks)


def _bias_dropped(new: nn.Module) -> bool:
    layer = new.conv if isinstance(new, SamePadConv2d) else new
    return isinstance(layer, MaskedLayerBase) and layer.bias is None


def _nothing_to_convert(model: nn.Module, dense_reason: dict) -> str:
    held = [(n, type(m).__name__) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    where = ", ".join(f"{c} '{n}'" for n, c in held[:6]) + (" ..." if len(held) > 6 else "")
    why = ""
    if dense_reason:
        why = "; left dense: " + ", ".join(f"'{k}' ({v})" for k, v in list(dense_reason.items())[:4])
    return (f"convert_: {type(model).__name__} has no layer SupSup can mask (nn.Linear, nn.Conv2d, transformers' "
            f"Conv1D{', or a registered class' if len(_HANDLERS) > 3 else ''}); its weights are in "
            f"{where or 'no module'}{why}")


def _warn_dense(model: nn.Module, rec: ModelRecord, frozen: bool) -> None:
    rows = _dense_modules(model, rec)
    if not rows:
        return
    by_class: dict[str, list[str]] = {}
    for name, cls, _, _ in rows:
        by_class.setdefault(cls, []).append(name or "(root)")
    total = sum(r[2] for r in rows)
    listing = "; ".join(f"{cls} x{len(ns)} ({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})"
                        for cls, ns in by_class.items())
    state = "frozen" if frozen else "trainable as before, shared by every task"
    warnings.warn(
        f"convert_: {len(rows)} modules holding {total:,} weights stay dense ({state}): {listing}. "
        "Name one in modules_to_save to learn it per task; supsup_fast.summary(model) says why each stays dense",
        ConversionWarning, stacklevel=3,
    )


def _dense_modules(model: nn.Module, rec: Optional[ModelRecord]) -> list[tuple[str, str, int, str]]:
    """``(name, class, weights, reason)`` of every module outside the SupSup layers that holds parameters."""
    out = []
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if _is_unit(m):
            skip.append(name)
            continue
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own:
            reason = rec.dense.get(name) if rec is not None else None
            if reason is None:
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                mha = isinstance(m, nn.MultiheadAttention) or (
                    parent and isinstance(model.get_submodule(parent), nn.MultiheadAttention))
                reason = ("nn.MultiheadAttention reads its projection weights directly" if mha
                          else "not a layer type SupSup masks")
            out.append((name, type(m).__name__, own, reason))
    return out


def _disable_fused_transformer_paths(model: nn.Module, rec: Optional[ModelRecord] = None) -> None:
    """Keep PyTorch's fused transformer kernels away from masked feed-forward layers.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder`` with a padding
    mask) may call a fused kernel that reads ``linear1.weight`` / ``linear2.weight`` directly,
    which would apply the unmasked base weight. The flags below are the ones those fast paths
    test; clearing them selects the ordinary module-by-module path (``unconvert`` restores them).
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
            isinstance(getattr(m, n, None), TaskModule) for n in ("linear1", "linear2", "norm1", "norm2")
        ):
            if rec is not None and m.activation_relu_or_gelu:
                rec.fused_flags[name] = ("activation_relu_or_gelu", m.activation_relu_or_gelu)
            m.activation_relu_or_gelu = 0
        if isinstance(m, nn.TransformerEncoder) and any(isinstance(c, TaskModule) for c in m.layers.modules()):
            if rec is not None and m.use_nested_tensor:
                rec.fused_flags[name] = ("use_nested_tensor", True)
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
# What convert_ did
# ---------------------------------------------------------------------------------------------
@dataclass
class ConversionSummary:
    """What a converted model holds (``print(sf.summary(model))``).

    Attributes:
        converted: ``{"Linear -> MaskedLinear": count, ...}``.
        dense: ``(name, class, weights, reason)`` of every module with weights left dense.
        modules_to_save: modules kept per task.
        biases_dropped: converted layers whose bias was dropped (``keep_bias=False``).
        bytes_per_task: bytes one frozen task adds (mask bits, norm statistics, per-task modules).
        mask_bytes_per_task: the mask bits alone.
        num_tasks: frozen tasks held.
        trainable: parameters that train now (the open task's; 0 with no task open).
        per_task_trainable: parameters each task trains (one score per masked weight, plus the modules kept).
        total_weights: parameters and base weights of the whole model.
    """

    converted: dict = field(default_factory=dict)
    dense: list = field(default_factory=list)
    modules_to_save: list = field(default_factory=list)
    biases_dropped: list = field(default_factory=list)
    bytes_per_task: int = 0
    mask_bytes_per_task: int = 0
    num_tasks: int = 0
    trainable: int = 0
    per_task_trainable: int = 0
    total_weights: int = 0

    def __str__(self) -> str:
        lines = ["SupSup conversion:"]
        for k, v in self.converted.items():
            lines.append(f"  {k}: {v}")
        if self.dense:
            lines.append(f"  left dense: {len(self.dense)} modules, {sum(r[2] for r in self.dense):,} weights")
            for name, cls, n, why in self.dense[:12]:
                lines.append(f"    {name or '(root)'} ({cls}, {n:,}): {why}")
            if len(self.dense) > 12:
                lines.append(f"    ... {len(self.dense) - 12} more")
        if self.modules_to_save:
            lines.append(f"  kept per task (modules_to_save): {', '.join(self.modules_to_save)}")
        if self.biases_dropped:
            lines.append(f"  biases dropped (keep_bias=False): {len(self.biases_dropped)} layers "
                         f"({', '.join(self.biases_dropped[:4])}{', ...' if len(self.biases_dropped) > 4 else ''})")
        lines.append(f"  bytes per task: {self.bytes_per_task:,} ({self.mask_bytes_per_task:,} of mask bits); "
                     f"{self.num_tasks} tasks stored")
        pct = 100.0 * self.per_task_trainable / max(1, self.total_weights)
        lines.append(f"  trainable per task: {self.per_task_trainable:,} of {self.total_weights:,} weights "
                     f"({pct:.2f}%); trainable now: {self.trainable:,}")
        return "\n".join(lines)


def summary(model: nn.Module) -> ConversionSummary:
    """What :func:`convert_` did to ``model`` and what a task costs (peft's ``print_trainable_parameters``)."""
    mods = _layers(model)
    rec = find_record(model)
    out = ConversionSummary()
    if rec is not None and rec.converted:
        seen = set()
        for fqn, cls in rec.converted.items():
            new = model.get_submodule(fqn) if _has(model, fqn) else None
            if new is None or id(new) in seen:
                continue
            seen.add(id(new))
            key = f"{cls.rsplit('.', 1)[-1]} -> {type(new).__name__}"
            out.converted[key] = out.converted.get(key, 0) + 1
        out.modules_to_save = list(rec.modules_to_save)
        out.biases_dropped = list(rec.biases_dropped)
    else:
        for m in mods:
            out.converted[type(m).__name__] = out.converted.get(type(m).__name__, 0) + 1
    out.dense = _dense_modules(model, rec)
    from .checkpoint.model_state import task_nbytes  # late: checkpoint sits above convert

    out.bytes_per_task = sum(task_nbytes(m) for m in mods)
    out.mask_bytes_per_task = sum(task_nbytes(m) for m in mods if isinstance(m, MaskedLayerBase))
    out.num_tasks = num_tasks(model)
    scores = {id(m.scores) for m in masked_modules(model) if m.scores is not None}
    out.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(m.weight.numel() for m in masked_modules(model))
    kept = sum(getattr(m, f"init_{i}").numel() for m in mods if isinstance(m, TaskDense)
               for i in range(len(m.param_names)))
    out.per_task_trainable = base + kept
    out.total_weights = base + sum(p.numel() for p in model.parameters() if id(p) not in scores)
    return out


def print_trainable_parameters(model: nn.Module) -> None:
    """Print peft's line for a SupSup model: parameters a task trains, weights in all, their ratio."""
    s = summary(model)
    print(f"trainable params per task: {s.per_task_trainable:,} || all weights: {s.total_weights:,} || "
          f"trainable%: {100.0 * s.per_task_trainable / max(1, s.total_weights):.4f} || bytes stored per task: "
          f"{s.bytes_per_task:,}")


def _has(model: nn.Module, fqn: str) -> bool:
    try:
        model.get_submodule(fqn)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------
# Back to plain torch.nn: merge_task and unconvert
# ---------------------------------------------------------------------------------------------
def _dense_twin(unit: nn.Module, t: Optional[int], where: str) -> nn.Module:
    """The plain module computing what ``unit`` computes with frozen task ``t`` (``None``: the base, no mask)."""
    if isinstance(unit, TaskDense):
        out = copy.deepcopy(unit.module)
        state = unit.task_state(t) if t is not None else {
            n: getattr(unit, f"init_{i}") for i, n in enumerate(unit.param_names)}
        with torch.no_grad():
            for n, v in state.items():
                out.get_parameter(n).copy_(v)
        return out
    skel = unit.__dict__.get(_DENSE_ATTR)
    layer = unit.conv if isinstance(unit, SamePadConv2d) else unit
    if skel is None:
        skel = _default_skeleton(layer, where)
    dense = copy.deepcopy(skel)
    device = next(iter(layer.buffers())).device
    dense.to_empty(device=device, recurse=False)
    for name, child in unit.named_children():  # an activation, a dropout: as the converted model has them
        if name in dense._modules:
            setattr(dense, name, copy.deepcopy(child))
    with torch.no_grad():
        if isinstance(layer, MaskedLayerBase):
            w = layer.masked_weight(t) if t is not None else layer.weight
            if layer.__dict__.get("_supsup_transposed"):
                w = w.t()
            dense.weight.copy_(w.reshape(dense.weight.shape))
            if getattr(dense, "bias", None) is not None:
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
                else:
                    dense.bias.zero_()
        else:
            if t is not None:
                mean, var = layer.running_mean[t], layer.running_var[t]
            elif layer.init_mean is not None:
                mean, var = layer.init_mean, layer.init_var
            else:
                mean, var = torch.zeros_like(dense.running_mean), torch.ones_like(dense.running_var)
            if dense.running_mean is not None:
                dense.running_mean.copy_(mean)
                dense.running_var.copy_(var)
                dense.num_batches_tracked.zero_()
            for b in ("weight", "bias"):
                d = getattr(dense, b, None)
                if d is not None:
                    v = getattr(layer, b)
                    d.copy_(v) if v is not None else (d.fill_(1.0) if b == "weight" else d.zero_())
    dense.train(unit.training)
    return dense


def _default_skeleton(layer: nn.Module, where: str) -> nn.Module:
    with torch.device("meta"):
        if isinstance(layer, MaskedLinear):
            return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             dtype=layer.weight.dtype)
        if isinstance(layer, MaskedConv2d):
            return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, bias=layer.bias is not None, dtype=layer.weight.dtype)
    raise SupsupError(f"'{where}' is a {type(layer).__name__} built directly rather than by convert_, so the dense "
                      "module it stands for is unknown")


def _units(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """``(parent, attribute, unit, name)`` for every place a converted unit sits, outermost units only."""
    out = []
    for parent_fqn, parent in model.named_modules():
        if _is_unit(parent) or _inside_unit(parent_fqn, model):
            continue
        for name, child in parent._modules.items():
            if child is not None and _is_unit(child):
                out.append((parent, name, child, f"{parent_fqn}.{name}" if parent_fqn else name))
    return out


def _restore(model: nn.Module, rec: Optional[ModelRecord]) -> None:
    """After the units are replaced: the fused-path flags, the parameters' trainability, no record."""
    if rec is not None:
        for fqn, (attr, value) in rec.fused_flags.items():
            if _has(model, fqn):
                setattr(model.get_submodule(fqn), attr, value)
        trainable = set(getattr(rec, "trainable", []))
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
    for m in model.modules():
        m.__dict__.pop(ATTR, None)


def merge_task(model: nn.Module, task: Union[int, str]) -> nn.Module:
    """A plain ``torch.nn`` copy of ``model`` computing frozen task ``task`` (an id or a name): every masked layer
    becomes its original class with ``W * M`` folded in, every per-task norm or module the original with the task's
    statistics or weights. ``model`` is not changed. The copy equals the converted model in ``eval()`` mode (a
    merged BatchNorm in ``train()`` mode normalises with batch statistics, as any BatchNorm does)."""
    t = task_id(model, task)
    if any(m.in_training for m in task_modules(model)):
        raise SupsupError("merge_task: a task is in training; freeze_task or discard_task first")
    memo = {id(unit): _dense_twin(unit, t, name) for _, _, unit, name in _units(model)}
    for m in model.modules():  # the record stays with the converted model
        rec = m.__dict__.get(ATTR)
        if rec is not None:
            memo[id(rec)] = None
    out = copy.deepcopy(model, memo)
    _restore(out, find_record(model))
    return out


def unconvert(model: nn.Module) -> nn.Module:
    """Turn a converted model back into plain ``torch.nn``, in place: every SupSup layer becomes its original class
    with the base weight (a pretrained base: the original weights; kept biases; the pretrained BatchNorm statistics),
    the ``modules_to_save`` their starting weights; the masks and the parameters' trainability flags are restored as
    before ``convert_``. Returns ``model``."""
    if any(m.in_training for m in task_modules(model)):
        raise SupsupError("unconvert: a task is in training; freeze_task or discard_task first")
    done: dict[int, nn.Module] = {}
    for parent, name, unit, where in _units(model):
        if id(unit) not in done:
            done[id(unit)] = _dense_twin(unit, None, where)
        setattr(parent, name, done[id(unit)])
    _restore(model, find_record(model))
    return model


def masked_layers(model: nn.Module) -> list[TaskModule]:
    """Every task module of ``model`` -- :class:`MaskedLayerBase` layers *and* :class:`TaskBatchNorm`
    norms -- in module order: :func:`supsup_fast.nn.task_modules` under its former name."""
    return task_modules(model)
