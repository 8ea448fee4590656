"""The manifest: what a bank holds. Built on save, read and validated before anything it names is used.

``manifest.json`` is ``{"format", "file_version", "body_sha256", "body"}``; the digest is taken over
the canonical JSON of the body, which names every shard (size, header digest), every task (name,
metadata, shard), the base shard, the layers' configs and the model's fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..errors import BankFileError, SupsupError
from ..format import FORMAT_VERSION, WORD_BITS
from ..nn.base import _as_task_id
from ._files import MANIFEST, SHARD_RE, canonical_json, check_json, open_regular, pread_exact, sha256_hex

FILE_FORMAT = "supsup_fast.bank"
#: Version of the bank layout (manifest, shards, digests). Bump on any incompatible change.
FILE_VERSION = 1
#: A manifest larger than this is not read (guards against garbage).
MAX_MANIFEST_BYTES = 1 << 30

#: The tensor dtypes a bank stores, by the name the manifest and the shards' checks use.
DTYPES = {
    "int32": torch.int32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}


@dataclass
class BankInfo:
    """A bank's manifest, as read (and verified) from disk.

    Attributes:
        path: the bank directory.
        bank_id: random id given at :func:`save_bank`; kept by :func:`append_task`.
        num_tasks: tasks stored in the bank.
        task_names: one name (or ``None``) per stored task.
        task_metadata: one caller-given JSON dict per stored task (training provenance etc.).
        metadata: the caller's bank-level JSON dict.
        configs: the :class:`~supsup_fast.config.SupsupConfig` dicts of the saved layers.
        fingerprint: layer names, types, shapes, ids and base of the model the bank belongs to.
        file_version / format_version: the bank layout and packed-mask format versions.
        nbytes: bytes of all files the manifest names (manifest included).
        loaded_tasks: after :func:`load_bank`, the bank indices of the tasks now in the model, in
            model order (model task ``i`` is bank task ``loaded_tasks[i]``).
    """

    path: str
    bank_id: str
    num_tasks: int
    task_names: list
    task_metadata: list
    metadata: dict
    configs: list
    fingerprint: dict
    file_version: int
    format_version: int
    nbytes: int
    library_version: str = ""
    loaded_tasks: list = field(default_factory=list)

    def task_index(self, name: str) -> int:
        """The bank index of the task called ``name``."""
        try:
            return self.task_names.index(name)
        except ValueError:
            raise SupsupError(f"bank {self.path} has no task named {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise SupsupError(f"a bank stores int32 / float tensors only, got {dtype}")


# ======================================================================================
# Building
# ======================================================================================
def new_body(fingerprint: dict, configs: list, metadata: dict) -> dict:
    """The body of a new bank (fresh id, no shards, no tasks yet) for a model with ``fingerprint``."""
    return {
        "bank_id": secrets.token_hex(16),
        "format_version": FORMAT_VERSION,
        "word_bits": WORD_BITS,
        "library_version": _library_version(),
        "created_unix": time.time(),
        "configs": configs,
        "fingerprint": fingerprint,
        "metadata": metadata,
        "shards": {},
        "base_shard": None,
        "tasks": [],
    }


def _library_version() -> str:
    from .. import __version__  # late: the package's __init__ imports this module before defining it

    return __version__


def manifest_bytes(body: dict) -> bytes:
    """The bytes of ``manifest.json`` for ``body``: the body with its digest and the format tags."""
    digest = sha256_hex(canonical_json(body).encode())
    doc = {"format": FILE_FORMAT, "file_version": FILE_VERSION, "body_sha256": digest, "body": body}
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n").encode()


def check_task_names(task_names, count: int) -> list:
    """``count`` task names (``None`` entries allowed) as a list, validated; all ``None`` for ``None``."""
    if task_names is None:
        return [None] * count
    if isinstance(task_names, str) or not isinstance(task_names, Sequence):
        raise SupsupError(f"task_names must be a sequence of str, got {type(task_names).__name__}")
    names = list(task_names)
    if len(names) != count:
        raise SupsupError(f"task_names has {len(names)} entries, the model holds {count} frozen tasks")
    for n in names:
        if n is not None and not isinstance(n, str):
            raise SupsupError(f"task names must be str (or None), got {n!r}")
    check_unique_names(names)
    return names


def check_unique_names(names: list) -> None:
    named = [n for n in names if n is not None]
    if len(set(named)) != len(named):
        dup = sorted({n for n in named if named.count(n) > 1})
        raise SupsupError(f"task names must be unique; repeated: {dup[:5]}")


def check_task_metadata(task_metadata, count: int) -> list:
    """``count`` per-task JSON dicts, validated; ``count`` empty dicts for ``None``."""
    if task_metadata is None:
        return [{} for _ in range(count)]
    if not isinstance(task_metadata, Sequence) or isinstance(task_metadata, (str, dict)):
        raise SupsupError(f"task_metadata must be a sequence of dicts, got {type(task_metadata).__name__}")
    if len(task_metadata) != count:
        raise SupsupError(f"task_metadata has {len(task_metadata)} entries, the model holds {count} frozen tasks")
    return [check_dict(f"task_metadata[{i}]", m) for i, m in enumerate(task_metadata)]


def check_dict(what: str, d) -> dict:
    """A caller's metadata dict as JSON round-trips it (``{}`` for ``None``)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SupsupError(f"{what} must be a dict, got {type(d).__name__}")
    return check_json(what, d)


# ======================================================================================
# Reading and validating
# ======================================================================================
def _want(d: Any, key: str, typ, where: str, path: str):
    if not isinstance(d, dict) or key not in d:
        raise BankFileError(f"{path}: corrupted manifest: {where} has no '{key}'")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BankFileError(f"{path}: corrupted manifest: {where}.{key} has type {type(v).__name__}")
    return v


def read_manifest(directory: str) -> dict:
    """The verified body of ``directory``'s manifest; a :class:`BankFileError` naming what is wrong."""
    fd = open_manifest(directory)
    try:
        return read_open_manifest(fd, os.path.join(directory, MANIFEST))
    finally:
        os.close(fd)


def open_manifest(directory: str) -> int:
    """A descriptor of ``directory``'s manifest, a regular file (never a link, a FIFO or a device)."""
    if not os.path.isdir(directory):
        raise BankFileError(f"{directory}: no mask bank here (not a directory)")
    try:
        return open_regular(os.path.join(directory, MANIFEST), "the manifest")
    except FileNotFoundError:
        raise BankFileError(f"{directory}: no mask bank here ({MANIFEST} is missing)") from None


def read_open_manifest(fd: int, mpath: str) -> dict:
    """The verified body of the manifest open at ``fd`` (the file ``mpath``): its size checked before
    anything is read."""
    size = os.fstat(fd).st_size
    if size > MAX_MANIFEST_BYTES:
        raise BankFileError(f"{mpath}: manifest of {size} bytes is larger than any bank's")
    return parse_manifest(pread_exact(fd, size, 0, mpath, "manifest"), mpath)


def parse_manifest(raw: bytes, mpath: str) -> dict:
    """The verified body of a manifest's bytes ``raw`` (read from ``mpath``)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BankFileError(f"{mpath}: truncated or corrupted manifest (not valid JSON: {e})") from None
    tag = doc.get("format") if isinstance(doc, dict) else None
    if tag != FILE_FORMAT:
        raise BankFileError(f"{mpath}: not a supsup_fast mask bank (format tag {tag!r})")
    version = doc.get("file_version")
    if version != FILE_VERSION:
        raise BankFileError(f"{mpath}: bank file version {version!r}; this supsup_fast reads version {FILE_VERSION}")
    digest = _want(doc, "body_sha256", str, "manifest", mpath)
    body = _want(doc, "body", dict, "manifest", mpath)
    try:
        actual = sha256_hex(canonical_json(body).encode())
    except ValueError as e:
        raise BankFileError(f"{mpath}: corrupted manifest ({e})") from None
    if actual != digest:
        raise BankFileError(f"{mpath}: corrupted manifest (checksum mismatch)")
    fmt = _want(body, "format_version", int, "body", mpath)
    if fmt != FORMAT_VERSION:
        raise BankFileError(f"{mpath}: masks in packed-format version {fmt}; this supsup_fast uses {FORMAT_VERSION}")
    if body.get("word_bits") != WORD_BITS:
        raise BankFileError(f"{mpath}: masks packed in {body.get('word_bits')!r}-bit words, expected {WORD_BITS}")
    _want(body, "bank_id", str, "body", mpath)
    fp = _want(body, "fingerprint", dict, "body", mpath)
    _want(fp, "layers", list, "fingerprint", mpath)
    _want(fp, "norms", list, "fingerprint", mpath)
    _want(body, "configs", list, "body", mpath)
    _want(body, "metadata", dict, "body", mpath)
    shards = _want(body, "shards", dict, "body", mpath)
    for fname, s in shards.items():
        if not SHARD_RE.match(fname):
            raise BankFileError(f"{mpath}: corrupted manifest: bad shard name {fname!r}")
        _want(s, "nbytes", int, f"shard {fname}", mpath)
        _want(s, "header_sha256", str, f"shard {fname}", mpath)
    tasks = _want(body, "tasks", list, "body", mpath)
    for i, t in enumerate(tasks):
        shard = _want(t, "shard", str, f"task {i}", mpath)
        if shard not in shards:
            raise BankFileError(f"{mpath}: corrupted manifest: task {i} names unknown shard {shard!r}")
        if t.get("name") is not None and not isinstance(t["name"], str):
            raise BankFileError(f"{mpath}: corrupted manifest: task {i} name is not a string")
        _want(t, "metadata", dict, f"task {i}", mpath)
    base = body.get("base_shard")
    if base is not None and base not in shards:
        raise BankFileError(f"{mpath}: corrupted manifest: base shard {base!r} is not listed")
    return body


def bank_info(directory: str, body: dict) -> BankInfo:
    """The :class:`BankInfo` of a verified body."""
    nbytes = sum(s["nbytes"] for s in body["shards"].values())
    with contextlib.suppress(OSError):
        nbytes += os.path.getsize(os.path.join(directory, MANIFEST))
    return BankInfo(
        path=directory, bank_id=body["bank_id"], num_tasks=len(body["tasks"]),
        task_names=[t.get("name") for t in body["tasks"]], task_metadata=[t["metadata"] for t in body["tasks"]],
        metadata=body["metadata"], configs=body["configs"], fingerprint=body["fingerprint"],
        file_version=FILE_VERSION, format_version=body["format_version"], nbytes=nbytes,
        library_version=str(body.get("library_version", "")),
    )


def layout(body: dict) -> dict[str, list[tuple[str, torch.dtype, tuple]]]:
    """Per module name: the per-task tensors a bank task holds, with dtypes and shapes."""
    try:
        return _layout_unchecked(body)
    except (KeyError, TypeError, ValueError) as e:
        raise BankFileError(f"corrupted manifest: bad fingerprint ({type(e).__name__}: {e})") from None


def _layout_unchecked(body: dict) -> dict[str, list[tuple[str, torch.dtype, tuple]]]:
    out = {}
    for e in body["fingerprint"]["layers"]:
        out[e["name"]] = [("mask", torch.int32, tuple(e["packed_shape"]))]
    for e in body["fingerprint"]["norms"]:
        dt = DTYPES.get(e.get("stats_dtype"), None)
        if dt is None:
            raise BankFileError(f"corrupted manifest: norm {e.get('name')!r} has stats dtype {e.get('stats_dtype')!r}")
        c = (int(e["num_features"]),)
        out[e["name"]] = [("running_mean", dt, c), ("running_var", dt, c)]
    return out


def resolve_task(t, count: int, path: str, names: Optional[list] = None) -> int:
    """The bank index of task ``t`` (an index or, given ``names``, a task name) of a bank of ``count`` tasks."""
    if isinstance(t, str):
        if names is None or t not in names:
            raise SupsupError(f"bank {path} has no task named {t!r}")
        return names.index(t)
    i = _as_task_id(t)
    if not 0 <= i < count:
        raise SupsupError(f"task {i} out of range: bank {path} holds tasks 0..{count - 1} ({count} tasks)")
    return i
