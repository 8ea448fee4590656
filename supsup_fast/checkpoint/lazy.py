"""Lazy access for banks larger than memory: :class:`LazyBank` and its device cache."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import BankFileError, SupsupError
from ..nn import MaskedLayerBase
from ._files import PathLike, as_path
from ._generations import Snapshot, read_consistently
from ._manifest import BankInfo, bank_info, layout, resolve_task
from ._shards import MissingShardError
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


def layout_of(snap: Snapshot) -> dict:
    """The bank's per-task layout, checked (what a :class:`LazyBank` needs of a version to open it)."""
    return layout(snap.body)


def _unique(items: list) -> list:
    if len(set(map(repr, items))) != len(items):
        raise SupsupError(f"tasks lists a task twice: {items}")
    return items


def _base_key(m: MaskedLayerBase) -> tuple:
    """What a layer's base weight is, cheaply: its tensor (address, writes) when resident; a lazy base (seed
    format 2) that is not resident is regenerated from its seed, so its ``base_id`` stands for it (reading
    ``m.weight`` would regenerate the dense weight on every activate)."""
    if m.weight_resident:
        return "weight", m.weight.data_ptr(), m.weight._version
    return "seed", m.base_id.data_ptr(), m.base_id._version


class LazyBank:
    """On-demand access to a bank's tasks: shards read when needed, a device cache with a byte budget.

    A task's tensors are read (and their digests checked) the first time they are needed and
    kept on ``device`` in a least-recently-used cache of at most ``cache_bytes`` bytes; nothing
    else of the bank is read into memory, so banks of any number of tasks can be served.

    The cache is the bank's own: it holds the bytes that were verified (read into memory, not
    mapped, so a shard changed on disk afterwards cannot change them), and :meth:`task` /
    :meth:`masks` hand out copies. The bank holds a lease on the version of the bank it opened
    (see ``_generations``): while it is open, a re-save of the bank by another process keeps that
    version's shards, so every task read is of the version opened; :meth:`refresh` moves to the
    current version and :meth:`close` releases it.

    One ``LazyBank`` may be shared by threads: reading, caching and counting are serialised by a
    lock (a miss reads under it). :meth:`activate` installs tasks into a model; two threads
    activating tasks into the *same* model race on that model, as any two writers to one module do.

    Use :meth:`activate` to make one task (or a few, for superposition) the model's tasks::

        bank = load_bank(model, "bank/", lazy=True)
        with torch.no_grad():
            for t, x in requests:
                bank.activate(model, t)   # model now computes task t (GG inference)
                y = model(x)
    """

    def __init__(self, path: PathLike, *, device: Optional[Union[str, torch.device]] = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, _snapshot: Optional[Snapshot] = None) -> None:
        self._snap = None
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise SupsupError(f"cache_bytes must be a non-negative int, got {cache_bytes!r}")
        self.path = as_path(path)
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise SupsupError(f"LazyBank: bad device {device!r} ({e})") from None
        self.cache_bytes = int(cache_bytes)
        snap = _snapshot if _snapshot is not None else read_consistently(self.path, layout_of, keep=True)[1]
        try:
            self._layout = layout(snap.body)
        except BaseException:
            snap.close()
            raise
        self._snap = snap
        self._lock = threading.RLock()
        self._cache: "OrderedDict[int, tuple[dict, int]]" = OrderedDict()
        self._cached = 0
        self.hits = self.misses = 0
        self._fp_cache = None

    @property
    def _body(self) -> dict:
        return self._snap.body

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
        """Move to the bank's current version (to see tasks appended since opening); returns ``num_tasks``.

        The cache is kept if the bank was only appended to, and dropped if it was replaced.
        """
        _, snap = read_consistently(self.path, layout_of, keep=True)
        with self._lock:
            old = self._snap
            body = snap.body
            if body["bank_id"] != old.body["bank_id"] or body["fingerprint"] != old.body["fingerprint"]:
                self._drop_cache()  # the bank was replaced: nothing cached belongs to it any more
            self._snap, self._layout = snap, layout(body)
            old.close()
            return self.num_tasks

    # ---- reading ------------------------------------------------------------------------
    def _cached_task(self, task: Union[int, str]) -> dict[str, dict[str, torch.Tensor]]:
        """The cache's own tensors of task ``task`` (read on a miss): not to be handed out or written to."""
        with self._lock:
            snap = self._snap
            i = resolve_task(task, self.num_tasks, self.path, self.task_names)
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                self.hits += 1
                return hit[0]
            self.misses += 1
            try:
                sh = snap.shard(snap.body["tasks"][i]["shard"])
            except MissingShardError as e:
                raise BankFileError(f"{e} (if the bank was replaced since this LazyBank opened it on a file system "
                                    "without locks, refresh() reads the new version)") from None
            out, nbytes = {}, 0
            for mname, fields in self._layout.items():
                out[mname] = {}
                for f, dt, shape in fields:
                    v = sh.get(f"{i}/{mname}/{f}", dt, shape).to(self.device)  # fresh memory, owned here
                    out[mname][f] = v
                    nbytes += v.numel() * v.element_size()
            while self._cache and self._cached + nbytes > self.cache_bytes:
                self._cached -= self._cache.popitem(last=False)[1][1]
            if nbytes <= self.cache_bytes:
                self._cache[i] = (out, nbytes)
                self._cached += nbytes
            return out

    def task(self, task: Union[int, str]) -> dict[str, dict[str, torch.Tensor]]:
        """Task ``task``'s tensors on ``device``: ``{module name: {"mask" | "running_mean" | ...: tensor}}``.

        The tensors are the caller's (copies of the cache's): writing to them changes nothing here.
        """
        return {m: {f: v.clone() for f, v in fields.items()} for m, fields in self._cached_task(task).items()}

    def masks(self, task: Union[int, str]) -> dict[str, torch.Tensor]:
        """Task ``task``'s packed masks ``{layer name: int32 [N, W]}`` on ``device`` (copies, the caller's)."""
        return {m: f["mask"].clone() for m, f in self._cached_task(task).items() if "mask" in f}

    def activate(self, model: nn.Module, task: Union[int, str, Sequence[Union[int, str]]]) -> None:
        """Install bank task ``task`` as the model's only task and select it (GG inference).

        With a sequence of tasks, they become the model's tasks ``0..k-1`` in that order (for
        superposition / task inference over a subset) and the last one is selected. The model
        must be the bank's model (checked by fingerprint) with no task in training.
        """
        mods = bank_modules(model)
        require_no_open_task(mods, "LazyBank.activate")
        fp, configs = self._fingerprint_for(model, mods)
        body = self._body
        check_fingerprint(body["fingerprint"], fp, self.path, saved_configs=body["configs"], model_configs=configs)
        many = not isinstance(task, (int, str, torch.Tensor))
        items = list(task) if many else [task]
        if not items:
            raise SupsupError("LazyBank.activate: no task given")
        idx = _unique([resolve_task(t, self.num_tasks, self.path, self.task_names) for t in items])
        per_task = [self._cached_task(i) for i in idx]
        mdev = model_device(model)
        with torch.no_grad():
            for name, m in mods:
                fields = self._layout[name]
                # stacked copies: the model may write into its bank, the cache must stay pristine
                install_tasks(m, {f: torch.stack([pt[name][f] for pt in per_task]).to(mdev) for f, _, _ in fields})

    @staticmethod
    def _model_key(mods) -> list:
        # a tensor's _version counts in-place writes: a changed base weight changes the key
        return [(name, id(m), *_base_key(m)) if isinstance(m, MaskedLayerBase) else (name, id(m)) for name, m in mods]

    def _remember_fingerprint(self, model: nn.Module, mods, fp: tuple) -> None:
        """``fp``: ``(fingerprint, configs)`` of the model, as :func:`model_fingerprint` gives them."""
        self._fp_cache = (weakref.ref(model), self._model_key(mods), fp)

    def _fingerprint_for(self, model: nn.Module, mods) -> tuple:
        # hashing every base's signs on each activate would dominate serving: recompute only
        # when a module or a base weight changed
        cached = self._fp_cache
        if cached is not None and cached[0]() is model and cached[1] == self._model_key(mods):
            return cached[2]
        fp = model_fingerprint(mods)
        self._remember_fingerprint(model, mods, fp)
        return fp

    def _drop_cache(self) -> None:
        self._cache.clear()
        self._cached = 0

    def close(self) -> None:
        """Drop the cache, close every shard and release the lease on the version opened (a writer that
        replaced the bank may then delete its shards: use :meth:`refresh` before reading again)."""
        with self._lock:
            self._drop_cache()
            self._snap.close()

    def __del__(self) -> None:
        snap = getattr(self, "_snap", None)
        if snap is not None:
            snap.close()

    def __enter__(self) -> "LazyBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_tasks

    def __repr__(self) -> str:
        return (f"LazyBank({self.path!r}, tasks={self.num_tasks}, device={self.device}, cached={len(self._cache)} "
                f"tasks / {self._cached} of {self.cache_bytes} bytes)")
