"""Lazy, memory-mapped access for banks larger than memory: :class:`LazyBank` and its device cache."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import SupsupError
from ..nn import MaskedLayerBase
from ._files import PathLike, as_path
from ._manifest import BankInfo, bank_info, layout, read_manifest, resolve_task
from ._shards import Shard
from .model_state import (
    bank_modules,
    check_fingerprint,
    install_tasks,
    model_device,
    model_fingerprint,
    require_no_open_task,
)

#: Default device-memory budget of a :class:`LazyBank`'s task cache.
DEFAULT_CACHE_BYTES = 256 << 20


def _unique(items: list) -> list:
    if len(set(map(repr, items))) != len(items):
        raise SupsupError(f"tasks lists a task twice: {items}")
    return items


class LazyBank:
    """On-demand access to a bank's tasks: memory-mapped shards, a device cache with a byte budget.

    A task's tensors are read (and their digests checked) the first time they are needed and
    kept on ``device`` in a least-recently-used cache of at most ``cache_bytes`` bytes; nothing
    else of the bank is read into memory, so banks of any number of tasks can be served.

    Use :meth:`activate` to make one task (or a few, for superposition) the model's tasks::

        bank = load_bank(model, "bank/", lazy=True)
        with torch.no_grad():
            for t, x in requests:
                bank.activate(model, t)   # model now computes task t (GG inference)
                y = model(x)
    """

    def __init__(self, path: PathLike, *, device: Optional[Union[str, torch.device]] = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, _body: Optional[dict] = None) -> None:
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise SupsupError(f"cache_bytes must be a non-negative int, got {cache_bytes!r}")
        self.path = as_path(path)
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise SupsupError(f"LazyBank: bad device {device!r} ({e})") from None
        self.cache_bytes = int(cache_bytes)
        self._body = read_manifest(self.path) if _body is None else _body
        self._layout = layout(self._body)
        self._shards: "OrderedDict[str, Shard]" = OrderedDict()
        self._cache: "OrderedDict[int, tuple[dict, int]]" = OrderedDict()
        self._cached = 0
        self.hits = self.misses = 0
        self._fp_cache = None

    # ---- what is in the bank -----------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self._body["tasks"])

    @property
    def task_names(self) -> list:
        return [t.get("name") for t in self._body["tasks"]]

    @property
    def info(self) -> BankInfo:
        return bank_info(self.path, self._body)

    @property
    def cached_tasks(self) -> list[int]:
        """Cached task indices, least recently used first."""
        return list(self._cache)

    @property
    def cached_bytes(self) -> int:
        return self._cached

    def refresh(self) -> int:
        """Re-read the manifest (to see tasks appended since opening); returns ``num_tasks``."""
        body = read_manifest(self.path)
        if body["bank_id"] != self._body["bank_id"] or body["fingerprint"] != self._body["fingerprint"]:
            self.close()  # the bank was replaced: nothing cached belongs to it any more
        self._body, self._layout = body, layout(body)
        return self.num_tasks

    # ---- reading ------------------------------------------------------------------------
    def _shard(self, fname: str) -> Shard:
        sh = self._shards.get(fname)
        if sh is None:
            sh = Shard(self.path, self._body, fname)
            self._shards[fname] = sh
            while len(self._shards) > 64:  # bound open file handles
                self._shards.popitem(last=False)[1].close()
        else:
            self._shards.move_to_end(fname)
        return sh

    def task(self, task: Union[int, str]) -> dict[str, dict[str, torch.Tensor]]:
        """Task ``task``'s tensors on ``device``: ``{module name: {"mask" | "running_mean" | ...: tensor}}``."""
        i = resolve_task(task, self.num_tasks, self.path, self.task_names)
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            self.hits += 1
            return hit[0]
        self.misses += 1
        sh = self._shard(self._body["tasks"][i]["shard"])
        out, nbytes = {}, 0
        for mname, fields in self._layout.items():
            out[mname] = {}
            for f, dt, shape in fields:
                v = sh.get(f"{i}/{mname}/{f}", dt, shape).to(self.device)
                out[mname][f] = v
                nbytes += v.numel() * v.element_size()
        while self._cache and self._cached + nbytes > self.cache_bytes:
            self._cached -= self._cache.popitem(last=False)[1][1]
        if nbytes <= self.cache_bytes:
            self._cache[i] = (out, nbytes)
            self._cached += nbytes
        return out

    def masks(self, task: Union[int, str]) -> dict[str, torch.Tensor]:
        """Task ``task``'s packed masks ``{layer name: int32 [N, W]}`` on ``device``."""
        return {m: f["mask"] for m, f in self.task(task).items() if "mask" in f}

    def activate(self, model: nn.Module, task: Union[int, str, Sequence[Union[int, str]]]) -> None:
        """Install bank task ``task`` as the model's only task and select it (GG inference).

        With a sequence of tasks, they become the model's tasks ``0..k-1`` in that order (for
        superposition / task inference over a subset) and the last one is selected. The model
        must be the bank's model (checked by fingerprint) with no task in training.
        """
        mods = bank_modules(model)
        require_no_open_task(mods, "LazyBank.activate")
        fp = self._fingerprint_for(model, mods)
        check_fingerprint(self._body["fingerprint"], fp, self.path)
        many = not isinstance(task, (int, str, torch.Tensor))
        items = list(task) if many else [task]
        if not items:
            raise SupsupError("LazyBank.activate: no task given")
        idx = _unique([resolve_task(t, self.num_tasks, self.path, self.task_names) for t in items])
        per_task = [self.task(i) for i in idx]
        mdev = model_device(model)
        with torch.no_grad():
            for name, m in mods:
                fields = self._layout[name]
                # stacked copies: the model may write into its bank, the cache must stay pristine
                install_tasks(m, {f: torch.stack([pt[name][f] for pt in per_task]).to(mdev) for f, _, _ in fields})

    @staticmethod
    def _model_key(mods) -> list:
        # a tensor's _version counts in-place writes: a changed base weight changes the key
        return [(name, id(m), m.weight.data_ptr(), m.weight._version) if isinstance(m, MaskedLayerBase)
                else (name, id(m)) for name, m in mods]

    def _remember_fingerprint(self, model: nn.Module, mods, fp: dict) -> None:
        self._fp_cache = (weakref.ref(model), self._model_key(mods), fp)

    def _fingerprint_for(self, model: nn.Module, mods) -> dict:
        # hashing every base's signs on each activate would dominate serving: recompute only
        # when a module or a base weight changed
        cached = self._fp_cache
        if cached is not None and cached[0]() is model and cached[1] == self._model_key(mods):
            return cached[2]
        fp, _ = model_fingerprint(mods)
        self._remember_fingerprint(model, mods, fp)
        return fp

    def close(self) -> None:
        """Drop the cache and close every shard."""
        for sh in self._shards.values():
            sh.close()
        self._shards.clear()
        self._cache.clear()
        self._cached = 0

    def __enter__(self) -> "LazyBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_tasks

    def __repr__(self) -> str:
        return (f"LazyBank({self.path!r}, tasks={self.num_tasks}, device={self.device}, cached={len(self._cache)} "
                f"tasks / {self._cached} of {self.cache_bytes} bytes)")
