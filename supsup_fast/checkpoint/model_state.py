"""A converted model as a bank sees it: the modules it stores, their fingerprint, their per-task and base tensors.

The package-internal API that both the bank files (:mod:`supsup_fast.checkpoint`) and
:mod:`supsup_fast.distributed` use to read a model's frozen tasks and to install tasks into it.
Functions that take ``mods`` take the ``[(name, module)]`` list of :func:`bank_modules`.

A bank stores :class:`~supsup_fast.nn.MaskedLinear` / :class:`~supsup_fast.nn.MaskedConv2d` (one packed
mask per task), :class:`~supsup_fast.nn.TaskBatchNorm` (running mean and variance per task) and
:class:`~supsup_fast.nn.TaskDense` (a ``modules_to_save`` module's parameters per task); the
questions every part of the library asks (which task modules, which device) are answered once, in
:mod:`supsup_fast.nn._model`, and only the bank's own rules are added here.

The fingerprint also covers the model's *dense* state (every parameter and buffer outside the task
modules: embeddings, attention, LayerNorms ... which a bank does not store), by name, dtype, shape and
SHA-256, so a bank is not applied to a model whose other weights differ; and it records how the model
was converted (config, modules swapped, modules kept per task), which
:func:`~supsup_fast.checkpoint.from_pretrained` replays on a plain model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import BankFileError, SupsupError
from ..nn import MaskedLayerBase, TaskBatchNorm, TaskDense, TaskModule
from ..nn._model import model_device, named_task_modules
from ..nn.record import find_record, record_of
from ..seed_format import UNRECORDED_SEED_FORMAT, sign_words
from ._files import check_json, sha256_hex
from ._manifest import dtype_name

__all__ = [
    "bank_modules", "num_frozen_tasks", "require_no_open_task", "model_device", "model_fingerprint",
    "check_fingerprint", "task_stacks", "task_tensors", "task_nbytes", "base_tensors", "install_tasks",
    "task_names", "set_task_names", "dense_state",
]


class Mods(list):
    """The ``[(name, module)]`` list of :func:`bank_modules`; ``model`` is the model they were taken from (the
    fingerprint of its dense state needs it)."""

    model: nn.Module = None


def bank_modules(model: nn.Module) -> Mods:
    """``(name, module)`` of every task module of ``model`` a bank stores, in module order.

    A :class:`SupsupError` if ``model`` holds a task module a bank cannot store or no masked layer.
    """
    found = Mods(named_task_modules(model))
    found.model = model
    for name, m in found:
        if not isinstance(m, (MaskedLayerBase, TaskBatchNorm, TaskDense)):
            raise SupsupError(f"module '{name}' is a {type(m).__name__}, a task module a bank cannot store; "
                              "banks store MaskedLinear / MaskedConv2d / TaskBatchNorm / TaskDense")
    if not any(isinstance(m, MaskedLayerBase) for _, m in found):
        raise SupsupError(f"{type(model).__name__} has no masked layers; convert it with convert_(model, config)")
    return found


def task_names(model: nn.Module, count: int) -> list:
    """The names of the model's ``count`` frozen tasks (``None`` for unnamed ones)."""
    rec = find_record(model)
    return list(rec.names(count)) if rec is not None else [None] * count


def set_task_names(model: nn.Module, names: list) -> None:
    """Name the model's frozen tasks ``names`` (one per task, by id)."""
    record_of(model).task_names = list(names)


def num_frozen_tasks(mods: Mods) -> int:
    """The number of frozen tasks, which every module must agree on (a :class:`SupsupError` if not)."""
    counts = {name: m.num_tasks for name, m in mods}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{n}={c}" for n, c in counts.items())
        raise SupsupError(f"the model's task layers disagree on the number of frozen tasks: {detail}")
    return next(iter(counts.values()))


def require_no_open_task(mods: Mods, what: str) -> None:
    """A :class:`SupsupError` naming ``what`` if any module has a task in training."""
    open_ = [n for n, m in mods if m.in_training]
    if open_:
        raise SupsupError(f"{what}: a task is in training in {open_[:3]}; freeze_task(model) first")


# ======================================================================================
# Fingerprint: which model a bank belongs to
# ======================================================================================
def _signs_digest(weight: torch.Tensor) -> str:
    """Digest of a signed-constant base's sign pattern (dtype-independent)."""
    signs = (weight.detach().reshape(-1) > 0).cpu().numpy()
    return sha256_hex(np.packbits(signs, bitorder="little").tobytes())


def _sign_words_digest(words: torch.Tensor, k: int) -> str:
    """:func:`_signs_digest` of the weight whose signs ``words`` holds (int32 ``[N, ceil(K/32)]``, bit set =
    positive, as :func:`supsup_fast.seed_format.sign_words`), without regenerating the weight."""
    rows = words.cpu().contiguous().numpy().astype("<i4", copy=False).view(np.uint8).reshape(words.shape[0], -1)
    if k % 8 == 0:  # every row ends on a byte: the rows' bytes, concatenated
        return sha256_hex(np.ascontiguousarray(rows[:, :k // 8]).tobytes())
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, :k]
    return sha256_hex(np.packbits(bits.reshape(-1), bitorder="little").tobytes())


def _layer_signs_digest(m: MaskedLayerBase, seed: int, layer_id: int) -> str:
    if m.weight_resident:
        return _signs_digest(m.weight)
    n, k = m.gemm_shape  # a lazy base (seed format 2): its sign words, 1 bit per weight
    return _sign_words_digest(sign_words(seed, layer_id, n, k, int(m.seed_format)), k)


def _config_dict(m: nn.Module) -> dict:
    cfg = getattr(m, "config", None)
    return check_json("config", dataclasses.asdict(cfg)) if cfg is not None else {}


def dense_state(model: nn.Module, mods) -> dict[str, torch.Tensor]:
    """Every persistent tensor of ``model``'s state dict outside its task modules (what a bank does not store)."""
    prefixes = tuple(f"{name}." for name, _ in mods)
    return {k: v for k, v in model.state_dict(keep_vars=False).items()
            if not k.startswith(prefixes) and isinstance(v, torch.Tensor)}


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return sha256_hex(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _dense_fingerprint(model: nn.Module, mods) -> list:
    out, seen = [], {}
    for k, v in dense_state(model, mods).items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        digest = seen.get(key) if key is not None else None
        if digest is None:
            digest = _tensor_digest(v)
            if key is not None:
                seen[key] = digest  # a tied weight is hashed once
        out.append({"name": k, "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                    "sha256": digest})
    return out


def _conversion(model: nn.Module) -> dict:
    rec = find_record(model)
    if rec is None or rec.config is None:
        return {}
    return check_json("conversion", {
        "config": dataclasses.asdict(rec.config), "converted": dict(rec.converted),
        "modules_to_save": list(rec.modules_to_save),
    })


def model_fingerprint(mods: Mods) -> tuple[dict, list]:
    """``(fingerprint, configs)``: every layer's and norm's name, type, shapes, layer id and base (seed, gain
    and sign-pattern digest of a signed-constant base), every per-task module's fields, the model's dense state
    (when ``mods`` come from :func:`bank_modules`) and its conversion, and the distinct layer configs they index."""
    configs: list = []
    layers, norms, per_task = [], [], []
    for name, m in mods:
        if isinstance(m, TaskDense):
            per_task.append({
                "name": name, "type": type(m).__name__,
                "fields": [[n, dtype_name(s.dtype), list(s.shape[1:])] for n, s in zip(m.param_names, m._stacks())],
            })
            continue
        if isinstance(m, MaskedLayerBase):
            cfg = _config_dict(m)
            if cfg not in configs:
                configs.append(cfg)
            signed = getattr(m, "base_id", None) is not None
            entry = {
                "name": name,
                "type": type(m).__name__,
                "weight_shape": list(m.weight_shape),
                "packed_shape": list(m.bank.shape[1:]),
                "layer_id": int(m.layer_id),
                "base": "signed_constant" if signed else "pretrained",
                "has_bias": m.bias is not None,
                "config": configs.index(cfg),
            }
            if signed:
                seed, layer_id = (int(v) for v in m.base_id.tolist()[:2])  # [seed, layer(, format)]
                entry.update(seed=seed, gain=float(m.config.gain), seed_format=int(m.seed_format),
                             signs_sha256=_layer_signs_digest(m, seed, layer_id))
            layers.append(entry)
        else:
            norms.append({
                "name": name,
                "type": type(m).__name__,
                "num_features": int(m.num_features),
                "stats_dtype": dtype_name(m.running_mean.dtype),
                "affine": [b for b in ("weight", "bias") if getattr(m, b, None) is not None],
                "init_stats": getattr(m, "init_mean", None) is not None,
            })
    fp = {"layers": layers, "norms": norms}
    if per_task:
        fp["per_task"] = per_task
    model = getattr(mods, "model", None)
    if model is not None:
        fp["dense"] = _dense_fingerprint(model, mods)
        conversion = _conversion(model)
        if conversion:
            fp["conversion"] = conversion
    return fp, configs


_LAYER_KEYS = ("name", "type", "weight_shape", "packed_shape", "layer_id", "base", "has_bias", "seed", "gain",
               "seed_format", "signs_sha256")
_NORM_KEYS = ("name", "type", "num_features", "affine", "init_stats")
_PER_TASK_KEYS = ("name", "type", "fields")
#: The config fields that decide what a stored mask means (how it was chosen, over which base); the
#: others are covered by the fingerprint (``keep_bias``: ``has_bias``, ``per_task_norm``: the norms) or
#: concern tasks not yet learned (``score_init``) or a capacity checked when tasks are loaded (``max_tasks``).
_CONFIG_KEYS = ("binariser", "density", "density_schedule", "erdos_renyi_scale", "base", "seed", "gain", "seed_format")
#: What a bank written before a key existed means by its absence (banks before seed format 2 are format 1)
_LAYER_DEFAULTS = {"seed_format": UNRECORDED_SEED_FORMAT}
_CONFIG_DEFAULTS = {"seed_format": UNRECORDED_SEED_FORMAT}


def _saved(entry: dict, key: str, signed: bool, defaults: dict):
    if key in entry or not signed:
        return entry.get(key)
    return defaults.get(key)


def check_fingerprint(saved: dict, model_fp: dict, path: str, *, saved_configs: Optional[list] = None,
                      model_configs: Optional[list] = None) -> None:
    """A :class:`BankFileError` naming the first difference between the bank's model and ``model``.

    The dense state is compared when both sides have it (banks written before it was recorded do not).
    Given both config lists (the bank's ``configs`` and :func:`model_fingerprint`'s), every masked
    layer's :data:`_CONFIG_KEYS` must agree too: a bank of top-k masks at density 0.5 is refused by
    a model configured for another binariser, density, schedule or seed.
    """
    kinds = [("layers", _LAYER_KEYS), ("norms", _NORM_KEYS)]
    if "per_task" in saved or "per_task" in model_fp:
        kinds.append(("per_task", _PER_TASK_KEYS))
    for kind, keys in kinds:
        a, b = saved.get(kind, [] if kind == "per_task" else None), model_fp.get(kind, [])
        if not isinstance(a, list):
            raise BankFileError(f"{path}: manifest fingerprint has no '{kind}' list")
        an = [e.get("name") if isinstance(e, dict) else None for e in a]
        bn = [e["name"] for e in b]
        if an != bn:
            raise BankFileError(
                f"{path} belongs to a different model: its {kind} are {an[:8]}{' ...' if len(an) > 8 else ''}, "
                f"the model's are {bn[:8]}{' ...' if len(bn) > 8 else ''}"
            )
        for ea, eb in zip(a, b):
            signed = isinstance(ea, dict) and ea.get("base") == "signed_constant"
            for k in keys:
                va = _saved(ea, k, signed, _LAYER_DEFAULTS) if isinstance(ea, dict) else None
                vb = eb.get(k)
                if k == "init_stats":  # absent in banks written before it was recorded: no kept statistics
                    va, vb = bool(va), bool(vb)
                if va != vb:
                    what = "sign pattern of the signed-constant base" if k == "signs_sha256" else k
                    raise BankFileError(
                        f"{path} belongs to a different model: {kind.rstrip('s')} '{eb['name']}' has {what} "
                        f"{va!r} in the bank and {vb!r} in the model" + _seed_format_hint(k, va)
                    )
    if "dense" in saved and "dense" in model_fp:
        _check_dense(saved["dense"], model_fp["dense"], path)
    if saved_configs is not None and model_configs is not None:
        _check_configs(saved, saved_configs, model_fp, model_configs, path)


def _check_dense(saved: list, model: list, path: str) -> None:
    if not isinstance(saved, list):
        raise BankFileError(f"{path}: manifest fingerprint's 'dense' is not a list")
    a = {e.get("name"): e for e in saved if isinstance(e, dict)}
    b = {e["name"]: e for e in model}
    if set(a) != set(b):
        only_bank, only_model = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise BankFileError(f"{path} belongs to a different model: dense (non-SupSup) tensors only in the bank "
                            f"{only_bank[:4]}, only in the model {only_model[:4]}")
    for name, eb in b.items():
        ea = a[name]
        for k, what in (("dtype", "dtype"), ("shape", "shape"), ("sha256", "values")):
            if ea.get(k) != eb.get(k):
                raise BankFileError(
                    f"{path} belongs to a model with other weights: the dense (non-SupSup) tensor '{name}' differs "
                    f"in {what} from the one the bank was saved with (a bank stores the masks, not these weights: "
                    "load the same pretrained weights first, or keep the module per task with modules_to_save)")


def _check_configs(saved: dict, saved_configs: list, model_fp: dict, model_configs: list, path: str) -> None:
    for ea, eb in zip(saved["layers"], model_fp["layers"]):
        i = ea.get("config")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(saved_configs) \
                or not isinstance(saved_configs[i], dict):
            raise BankFileError(f"{path}: corrupted manifest: layer '{eb['name']}' names config {i!r}")
        a, b = saved_configs[i], model_configs[eb["config"]]
        for k in _CONFIG_KEYS:
            va = _saved(a, k, True, _CONFIG_DEFAULTS)
            if va != b.get(k):
                raise BankFileError(
                    f"{path} was saved from a model configured differently: layer '{eb['name']}' has {k} "
                    f"{va!r} in the bank and {b.get(k)!r} in the model (SupsupConfig.{k})" + _seed_format_hint(k, va)
                )


def _seed_format_hint(key: str, saved) -> str:
    # the default seed format changed from 1 to 2: say how to open a bank saved with the old one
    if key != "seed_format":
        return ""
    return f"; convert the model with SupsupConfig(seed_format={saved!r}) to load this bank"


# ======================================================================================
# Tensors: per task and base
# ======================================================================================
def task_stacks(m: TaskModule) -> dict[str, torch.Tensor]:
    """The module's frozen tasks by field, each ``[T, ...]``: a masked layer's packed ``mask`` bank, a norm's
    ``running_mean`` and ``running_var`` (the fields a bank task holds, in this order)."""
    if isinstance(m, MaskedLayerBase):
        return {"mask": m.bank}
    if isinstance(m, TaskDense):
        return dict(zip(m.param_names, m._stacks()))
    return {"running_mean": m.running_mean, "running_var": m.running_var}


def task_tensors(name: str, m: TaskModule, t: int, index: int) -> dict[str, torch.Tensor]:
    """Model task ``t``'s tensors of module ``name``, keyed ``"<index>/<name>/<field>"`` for bank task ``index``."""
    return {f"{index}/{name}/{f}": v[t] for f, v in task_stacks(m).items()}


def task_nbytes(m: TaskModule) -> int:
    """Bytes one frozen task of the module takes in a bank."""
    if isinstance(m, MaskedLayerBase):
        return int(m.bank.shape[1] * m.bank.shape[2]) * 4
    if isinstance(m, TaskDense):
        return sum(int(torch.Size(s.shape[1:]).numel()) * s.element_size() for s in m._stacks())
    return 2 * m.num_features * m.running_mean.element_size()


def base_tensors(name: str, m: TaskModule) -> dict[str, torch.Tensor]:
    """The frozen, non-regenerable base state of one module: pretrained weight, biases, norm affine."""
    out = {}
    if isinstance(m, MaskedLayerBase):
        if getattr(m, "base_id", None) is None:
            out[f"{name}/weight"] = m.weight
        if m.bias is not None:
            out[f"{name}/bias"] = m.bias
    elif isinstance(m, TaskDense):
        for i, n in enumerate(m.param_names):  # where every new task starts
            out[f"{name}/init/{n}"] = getattr(m, f"init_{i}")
    else:
        for b in ("weight", "bias", "init_mean", "init_var"):
            if getattr(m, b, None) is not None:
                out[f"{name}/{b}"] = getattr(m, b)
    return out


def install_tasks(m: TaskModule, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` (``[T, ...]`` per field of :func:`task_stacks`) the module's frozen tasks and select
    the last one."""
    if isinstance(m, MaskedLayerBase):
        m.bank = tensors["mask"].to(torch.int32)
        m._bank_store = None
    elif isinstance(m, TaskDense):
        for i, n in enumerate(m.param_names):
            setattr(m, f"stack_{i}", tensors[n].to(getattr(m, f"init_{i}").dtype))
    else:
        dt = m.running_mean.dtype
        m.running_mean = tensors["running_mean"].to(dt)
        m.running_var = tensors["running_var"].to(dt)
    m._mode_after_load()  # the same state a loaded state dict leaves: last frozen task selected
