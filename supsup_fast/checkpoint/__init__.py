"""Mask-bank files: every frozen task's bits on disk, verified on the way back, never pickled.

A bank is a directory::

    bank/
      manifest.json                     what the bank holds; atomically replaced on every change
      base-<token>.safetensors          pretrained base weights and frozen biases (if the model has any)
      tasks-<first>-<token>.safetensors one shard per save / append: packed masks and norm statistics
      .lock                             serialises writers (POSIX advisory lock)

Tensors live in `safetensors <https://github.com/huggingface/safetensors>`_ shards, so a bank is
read without executing code and a task's tensors can be read one at a time (:class:`LazyBank`).
Adding a task writes one new shard and a new manifest; the other shards are never rewritten
(:func:`append_task`).

Integrity is a chain of SHA-256 digests: the manifest carries the digest of its own body; the body
names every shard with its size and the digest of its safetensors header; each header's metadata
carries the digest of every tensor's raw bytes. A truncated, bit-flipped, foreign or future-version
file is refused with :class:`~supsup_fast.errors.BankFileError` naming the file and the problem.
The model's fingerprint (layer names, types, shapes, layer ids, base seeds and the sign pattern of
every signed-constant base) is stored too, so a bank is never applied to a model it was not made for.

Every write goes to a temporary file in the same directory, is flushed and ``fsync``-ed, and
``os.replace``-d into place, then the directory is ``fsync``-ed. Shards get fresh names and are in
place before the manifest that names them, so a process killed at any point leaves the previous
bank readable and intact; a write that fails (a full disk, an I/O error) removes the shards it
made and raises, leaving the bank as it was. Readers never see a partial bank: each holds a lease
on the manifest generation it reads, and a writer deletes no shard a held generation names
(``_generations``). Files are opened as regular files only and read by position, never mapped.

What a bank holds: the frozen tasks (bits and per-task BatchNorm statistics), task names and
caller-given per-task metadata, the base (seed and config; pretrained weights and frozen
biases / affine parameters when present). What it does not hold: an open task's scores and the
"transfer" score mean (training state: use ``model.state_dict()`` for that), and the weights of
modules :func:`~supsup_fast.convert.convert_` left dense.

This module is the public API; the package holds one concern per module: ``_files`` (file names,
digests, atomic writes, the writer lock), ``_manifest`` (the manifest's schema), ``_shards``
(safetensors shards and their verification), :mod:`~supsup_fast.checkpoint.model_state` (the model
side, shared with :mod:`supsup_fast.distributed`) and :mod:`~supsup_fast.checkpoint.lazy`
(:class:`LazyBank` and its device cache). Imports run one way: files, then manifest and shards,
then model state, then lazy and this module.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import BankFileError, SupsupError
from ..format import FORMAT_VERSION as FORMAT_VERSION
from ..format import WORD_BITS as WORD_BITS
from ..nn.base import _as_task_id
from . import _files, _generations, _manifest, _shards, model_state
from ._files import LOCK as LOCK
from ._files import MANIFEST as MANIFEST
from ._files import PathLike as PathLike
from ._manifest import FILE_FORMAT, FILE_VERSION, BankInfo
from ._manifest import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from ._shards import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from ._shards import SHARD_BYTES as SHARD_BYTES
from .lazy import DEFAULT_CACHE_BYTES as DEFAULT_CACHE_BYTES
from .lazy import LazyBank

__all__ = [
    "FILE_FORMAT", "FILE_VERSION", "BankInfo", "LazyBank", "save_bank", "append_task", "load_bank",
    "read_bank_info", "verify_bank",
]


# ======================================================================================
# Saving
# ======================================================================================
def save_bank(
    model: nn.Module,
    path: PathLike,
    *,
    task_names: Optional[Sequence[Optional[str]]] = None,
    metadata: Optional[dict] = None,
    task_metadata: Optional[Sequence[dict]] = None,
) -> BankInfo:
    """Save every frozen task of ``model`` as a new bank at directory ``path`` (replacing any bank there).

    Args:
        model: a converted model; every task layer must hold the same number ``T`` of frozen tasks.
            A task still in training is not a frozen task and is not saved.
        path: the bank directory (created if missing; an existing bank there is replaced atomically).
        task_names: ``T`` unique names (or ``None`` entries).
        metadata: a JSON dict stored with the bank (e.g. the run's arguments).
        task_metadata: ``T`` JSON dicts, one per task (training provenance: data, steps, accuracy...).

    Returns:
        The new bank's :class:`BankInfo`.

    Replacing a bank deletes its old shards once the new manifest is in place and no reader holds
    the old version: an open :class:`LazyBank` of the old bank keeps reading that version until it
    is refreshed (:meth:`LazyBank.refresh`) or closed, and its shards are deleted by a later write.

    A write that fails (``OSError``: a full disk, an I/O error) before the new manifest is in place
    removes what it wrote and raises, the bank unchanged; once the manifest is in place the save has
    happened, and a failed ``fsync`` of the directory only warns
    (:class:`~supsup_fast.errors.BankDurabilityWarning`). The same holds for :func:`append_task`.
    """
    directory = _files.as_path(path)
    mods = model_state.bank_modules(model)
    count = model_state.num_frozen_tasks(mods)
    names = _manifest.check_task_names(task_names, count)
    tmeta = _manifest.check_task_metadata(task_metadata, count)
    meta = _manifest.check_dict("metadata", metadata)
    fingerprint, configs = model_state.model_fingerprint(mods)
    _files.prepare_dir(directory)
    with _files.writer_lock(directory):
        body = _write_new_bank(directory, mods, fingerprint, configs, meta, names, tmeta)
        _generations.retire(directory, body)
    return _manifest.bank_info(directory, body)


def _write_new_bank(directory: str, mods, fingerprint: dict, configs: list, meta: dict, names: list,
                    tmeta: list) -> dict:
    """Write a new bank of the model's base and its first ``len(names)`` frozen tasks: shards first, then the
    manifest that names them. The caller holds the writer lock. Returns the manifest body."""
    count = len(names)
    body = _manifest.new_body(fingerprint, configs, meta)
    written: list = []
    try:
        base = {}
        for name, m in mods:
            base.update(model_state.base_tensors(name, m))
        if base:
            fname = _files.shard_name(None)
            written.append(fname)
            body["shards"][fname] = _shards.write_shard(directory, fname, base, body)
            body["base_shard"] = fname
        per_task = sum(model_state.task_nbytes(m) for _, m in mods) if count else 0
        group = max(1, SHARD_BYTES // max(per_task, 1))
        for first in range(0, count, group):
            tasks = range(first, min(count, first + group))
            tensors = {}
            for t in tasks:
                for name, m in mods:
                    tensors.update(model_state.task_tensors(name, m, t, t))
            fname = _files.shard_name(first)
            written.append(fname)
            body["shards"][fname] = _shards.write_shard(directory, fname, tensors, body)
            body["tasks"].extend({"name": names[t], "metadata": tmeta[t], "shard": fname} for t in tasks)
        _publish(directory, body)
    except BaseException as e:
        _undo_unpublished(directory, written, e)
        raise
    return body


def _publish(directory: str, body: dict) -> None:
    """Make ``body`` the bank's manifest, its shards already written; the previous generation is kept
    for the readers that hold it (``_generations``)."""
    _files.fsync_dir(directory)  # every new shard is durable before a manifest names it
    kept = _generations.keep_current(directory)
    mpath = os.path.join(directory, MANIFEST)
    try:
        _files.atomic_write(mpath, _manifest.manifest_bytes(body))
    except BaseException:
        # not replaced: the kept name is just a second name of the current manifest
        if kept is not None and _same_file(kept, mpath):
            _files.remove_quietly(directory, [os.path.basename(kept)])
        raise


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _undo_unpublished(directory: str, written: list, error: BaseException) -> None:
    """After a failed write: remove the shards it wrote, unless the manifest in place names them (the
    write did complete) or cannot be read (then they stay, for the next write to remove)."""
    if not written:
        return
    if os.path.lexists(os.path.join(directory, MANIFEST)):
        try:
            named = set(_manifest.read_manifest(directory)["shards"])
        except BankFileError:
            return
    else:
        named = set()  # a new bank whose first manifest was never written
    if named & set(written):
        return
    _files.remove_quietly(directory, written)
    with contextlib.suppress(OSError):
        _files.fsync_dir(directory)
    error.add_note(f"{directory}: the bank is unchanged (the {len(written)} new shard file(s) were removed)")


def append_task(
    model: nn.Module,
    path: PathLike,
    task: int,
    *,
    name: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> BankInfo:
    """Add the model's frozen task ``task`` to the bank at ``path``; no other shard is rewritten.

    The bank must have been saved from this model (same fingerprint) and hold exactly ``task``
    tasks, so bank and model keep one task order (the new task gets bank index ``task``).
    A missing bank is created when ``task == 0``.

    Returns:
        The updated :class:`BankInfo`.
    """
    directory = _files.as_path(path)
    mods = model_state.bank_modules(model)
    count = model_state.num_frozen_tasks(mods)
    t = _as_task_id(task)
    if not 0 <= t < count:
        raise SupsupError(f"append_task: task {t} is not a frozen task of the model (num_tasks={count})")
    if name is not None and not isinstance(name, str):
        raise SupsupError(f"append_task: name must be a str, got {name!r}")
    meta = _manifest.check_dict("metadata", metadata)
    fingerprint, configs = model_state.model_fingerprint(mods)
    if not os.path.lexists(os.path.join(directory, MANIFEST)):
        if t != 0:
            raise BankFileError(f"{directory}: no mask bank here to append task {t} to (save_bank first, "
                                "or append task 0 to start one)")
        _files.prepare_dir(directory)
        with _files.writer_lock(directory):
            if not os.path.lexists(os.path.join(directory, MANIFEST)):
                # a new bank of the model's base and task 0, in one manifest write
                body = _write_new_bank(directory, mods, fingerprint, configs, {}, [name], [meta])
                _generations.retire(directory, body)
                return _manifest.bank_info(directory, body)
    with _files.writer_lock(directory):
        body = _manifest.read_manifest(directory)
        model_state.check_fingerprint(body["fingerprint"], fingerprint, directory,
                                      saved_configs=body["configs"], model_configs=configs)
        have = len(body["tasks"])
        if have != t:
            raise SupsupError(f"append_task: the bank at {directory} holds {have} tasks, so the next task to append "
                              f"is model task {have}, not {t}")
        _manifest.check_unique_names([e.get("name") for e in body["tasks"]] + [name])
        tensors = {}
        for mname, m in mods:
            tensors.update(model_state.task_tensors(mname, m, t, t))
        fname = _files.shard_name(t)
        try:
            body["shards"][fname] = _shards.write_shard(directory, fname, tensors, body)
            body["tasks"].append({"name": name, "metadata": meta, "shard": fname})
            _publish(directory, body)
        except BaseException as e:
            _undo_unpublished(directory, [fname], e)
            raise
        _generations.retire(directory, body)
    return _manifest.bank_info(directory, body)


# ======================================================================================
# Loading
# ======================================================================================
def read_bank_info(path: PathLike) -> BankInfo:
    """The verified manifest of the bank at ``path`` (no tensor is read)."""
    directory = _files.as_path(path)
    return _manifest.bank_info(directory, _manifest.read_manifest(directory))


def verify_bank(path: PathLike) -> BankInfo:
    """Read and check every tensor of the bank at ``path``; a :class:`BankFileError` on the first bad one."""
    directory = _files.as_path(path)

    def read(snap: _generations.Snapshot) -> None:
        body = snap.body
        fields = _manifest.layout(body)
        for i, t in enumerate(body["tasks"]):
            sh = snap.shard(t["shard"])
            for mname, mfields in fields.items():
                for f, dt, shape in mfields:
                    sh.get(f"{i}/{mname}/{f}", dt, shape)
        if body.get("base_shard"):
            sh = snap.shard(body["base_shard"])
            for key in sh.digests:
                sh.get(key, sh.stored_dtype(key), sh.header.get(key, {}).get("shape", ()))

    _, snap = _generations.read_consistently(directory, read)
    return _manifest.bank_info(directory, snap.body)


def _read_base(mods, snap: _generations.Snapshot) -> dict:
    """The bank's base tensors for the model, read and checked (nothing installed yet)."""
    directory, body = snap.directory, snap.body
    want = {}
    for name, m in mods:
        want.update(model_state.base_tensors(name, m))
    fname = body.get("base_shard")
    have = set()
    sh = None
    if fname is not None:
        sh = snap.shard(fname)
        have = set(sh.digests)
    if set(want) != have:
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        raise BankFileError(f"{directory} belongs to a different model: base tensors missing from the bank "
                            f"{missing[:4]}, in the bank but not in the model {extra[:4]}")
    if sh is None:
        return {}
    for key, target in want.items():  # every header entry checked before anything is allocated
        sh.check(key, sh.stored_dtype(key, "base tensor"), tuple(target.shape))
    return {key: sh.get(key, sh.stored_dtype(key, "base tensor"), tuple(target.shape)) for key, target in want.items()}


def _install_base(mods, loaded: dict) -> None:
    want = {}
    for name, m in mods:
        want.update(model_state.base_tensors(name, m))
    with torch.no_grad():  # verified everything first: install nothing from a bad file
        for key, target in want.items():
            target.copy_(loaded[key])


def load_bank(
    model: nn.Module,
    path: PathLike,
    *,
    tasks: Optional[Sequence[Union[int, str]]] = None,
    device: Optional[Union[str, torch.device]] = None,
    lazy: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Union[BankInfo, LazyBank]:
    """Load the bank at ``path`` into ``model``, after verifying every byte used.

    Args:
        model: a converted model with the same layers as the one the bank was saved from (its
            frozen tasks, if any, are replaced). No task may be in training.
        path: the bank directory.
        tasks: bank task indices or names to load, in the order the model should hold them
            (default: all, in bank order).
        device: eager: must be ``None`` or the model's device. Lazy: where the task cache lives
            (default: the model's device).
        lazy: return a :class:`LazyBank` that reads tasks on demand instead of loading them.
        cache_bytes: the lazy cache's budget (bytes of device memory).

    Returns:
        Eager: the :class:`BankInfo` (``loaded_tasks`` gives the bank index of each model task).
        Lazy: a :class:`LazyBank` bound to the bank; the model's base (pretrained weights) is
        restored, its tasks are untouched until :meth:`LazyBank.activate`.
    """
    directory = _files.as_path(path)
    mods = model_state.bank_modules(model)
    model_state.require_no_open_task(mods, "load_bank")
    fingerprint, configs = model_state.model_fingerprint(mods)
    mdev = model_state.model_device(model)
    if lazy:
        if tasks is not None:
            raise SupsupError("load_bank: tasks= selects what an eager load installs; a LazyBank reads any task "
                              "on demand (use LazyBank.activate(model, tasks))")

        def read_lazy(snap):
            model_state.check_fingerprint(snap.body["fingerprint"], fingerprint, directory,
                                          saved_configs=snap.body["configs"], model_configs=configs)
            return _read_base(mods, snap)

        base, snap = _generations.read_consistently(directory, read_lazy, keep=True)
        try:
            bank = LazyBank(directory, device=mdev if device is None else device, cache_bytes=cache_bytes,
                            _snapshot=snap)
        except BaseException:
            snap.close()
            raise
        _install_base(mods, base)
        bank._remember_fingerprint(model, mods, (fingerprint, configs))
        return bank
    if device is not None and torch.device(device) != mdev:
        raise SupsupError(f"load_bank: the model is on {mdev}, not {device}; move it with model.to(device) first")
    if tasks is not None and (isinstance(tasks, (int, str)) or not isinstance(tasks, Iterable)):
        raise SupsupError(f"tasks must be a sequence of task indices or names, got {tasks!r}")
    tasks = None if tasks is None else list(tasks)

    def read_eager(snap):
        body = snap.body
        model_state.check_fingerprint(body["fingerprint"], fingerprint, directory,
                                      saved_configs=body["configs"], model_configs=configs)
        order = _task_order(body, tasks, directory, mods)
        fields = _manifest.layout(body)
        # every tensor's header entry is checked against the files before anything is allocated
        # (a manifest naming 200,000 tasks is refused at the first one its shards do not hold)
        for bt in order:
            sh = snap.shard(body["tasks"][bt]["shard"])
            for name, _ in mods:
                for f, dt, shape in fields[name]:
                    sh.check(f"{bt}/{name}/{f}", dt, shape)
        base = _read_base(mods, snap)
        stacks = {name: {f: torch.empty((len(order),) + shape, dtype=dt) for f, dt, shape in fields[name]}
                  for name, _ in mods}
        for i, bt in enumerate(order):
            sh = snap.shard(body["tasks"][bt]["shard"])
            for name, _ in mods:
                for f, dt, shape in fields[name]:
                    stacks[name][f][i] = sh.get(f"{bt}/{name}/{f}", dt, shape)
        return order, base, stacks

    (order, base, stacks), snap = _generations.read_consistently(directory, read_eager)
    _install_base(mods, base)
    with torch.no_grad():
        for name, m in mods:
            model_state.install_tasks(m, {f: v.to(mdev) for f, v in stacks[name].items()})
    info = _manifest.bank_info(directory, snap.body)
    info.loaded_tasks = order
    return info


def _task_order(body: dict, tasks: Optional[list], directory: str, mods) -> list:
    """The bank indices an eager load installs, in model order, checked against the model's ``max_tasks``."""
    names = [t.get("name") for t in body["tasks"]]
    count = len(body["tasks"])
    if tasks is None:
        order = list(range(count))
    else:
        order = [_manifest.resolve_task(t, count, directory, names) for t in tasks]
        if len(set(order)) != len(order):
            raise SupsupError(f"tasks lists a task twice: {tasks}")
    for name, m in mods:
        if m.max_tasks is not None and len(order) > m.max_tasks:
            raise SupsupError(f"load_bank: loading {len(order)} tasks into '{name}', which allows max_tasks="
                              f"{m.max_tasks}")
    return order
