"""Mask-bank files: every frozen task's bits on disk, verified on the way back, never pickled.

A bank is a directory::

    bank/
      manifest.json                     what the bank holds; atomically replaced on every change
      base-<token>.safetensors          pretrained base weights and frozen biases (if the model has any)
      tasks-<first>-<token>.safetensors one shard per save / append: packed masks and norm statistics
      .lock                             serialises writers (POSIX advisory lock)

Tensors live in `safetensors <https://github.com/huggingface/safetensors>`_ shards, so a bank is
read without executing code and a task's tensors can be memory-mapped one at a time
(:class:`LazyBank`). Adding a task writes one new shard and a new manifest; the other shards are
never rewritten (:func:`append_task`).

Integrity is a chain of SHA-256 digests: the manifest carries the digest of its own body; the body
names every shard with its size and the digest of its safetensors header; each header's metadata
carries the digest of every tensor's raw bytes. A truncated, bit-flipped, foreign or future-version
file is refused with :class:`~supsup_fast.errors.BankFileError` naming the file and the problem.
The model's fingerprint (layer names, types, shapes, layer ids, base seeds and the sign pattern of
every signed-constant base) is stored too, so a bank is never applied to a model it was not made for.

Every write goes to a temporary file in the same directory, is flushed and ``fsync``-ed, and
``os.replace``-d into place, then the directory is ``fsync``-ed. Shards get fresh names and are in
place before the manifest that names them, so a process killed at any point leaves the previous
bank readable and intact.

What a bank holds: the frozen tasks (bits and per-task BatchNorm statistics), task names and
caller-given per-task metadata, the base (seed and config; pretrained weights and frozen
biases / affine parameters when present). What it does not hold: an open task's scores and the
"transfer" score mean (training state: use ``model.state_dict()`` for that), and the weights of
modules :func:`~supsup_fast.convert.convert_` left dense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import struct
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .errors import BankFileError, SupsupError
from .format import FORMAT_VERSION, WORD_BITS

try:  # POSIX advisory locks serialise writers; elsewhere a single writer is the caller's duty
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FILE_FORMAT = "supsup_fast.bank"
#: Version of the bank layout (manifest, shards, digests). Bump on any incompatible change.
FILE_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
#: A save splits its tasks into shards of about this many bytes.
SHARD_BYTES = 64 << 20
#: Default device-memory budget of a :class:`LazyBank`'s task cache.
DEFAULT_CACHE_BYTES = 256 << 20
#: A manifest larger than this is not read (guards against garbage).
MAX_MANIFEST_BYTES = 1 << 30
#: A safetensors header larger than this is not read.
MAX_HEADER_BYTES = 256 << 20

_SHARD_RE = re.compile(r"^(?:tasks-\d{6,}|base)-[0-9a-f]{16}\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")
_DTYPES = {
    "int32": torch.int32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}
_ST_DTYPES = {"I32": "int32", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

PathLike = Union[str, "os.PathLike[str]"]


# ======================================================================================
# What a bank file says about itself
# ======================================================================================
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


# ======================================================================================
# Small validated helpers
# ======================================================================================
def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _tensor_digest(t: torch.Tensor) -> str:
    return _sha256(_tensor_bytes(t))


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise SupsupError(f"a bank stores int32 / float tensors only, got {dtype}")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _check_json(what: str, value: Any) -> Any:
    """``value`` as JSON round-trips it; a :class:`SupsupError` if it cannot be stored as JSON."""
    try:
        return json.loads(_canonical(value))
    except (TypeError, ValueError) as e:
        raise SupsupError(f"{what} must be JSON-serialisable (str keys, no NaN/inf): {e}") from None


def _as_path(path: PathLike, what: str = "path") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise SupsupError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise SupsupError(f"{what} must be a non-empty path, got {path!r}")
    return os.path.abspath(p)


def _fsync_dir(path: str) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(f, data) -> None:
    """Write ``data`` to ``f`` (a separate function so tests can interrupt a write midway)."""
    f.write(data)


def _atomic_write(path: str, data) -> None:
    """Replace ``path`` by ``data`` all-or-nothing: temp file, fsync, rename, fsync of the directory."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


@contextlib.contextmanager
def _writer_lock(directory: str) -> Iterator[None]:
    """One writer at a time: two concurrent appends would otherwise both write task ``T``."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ======================================================================================
# The model side: which modules hold what
# ======================================================================================
def _task_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .nn import MaskedLayerBase, TaskBatchNorm
    from .nn.base import TaskModule

    if not isinstance(model, nn.Module):
        raise SupsupError(f"model must be an nn.Module, got {type(model).__name__}")
    found, seen = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, TaskModule) or id(m) in seen:
            continue
        seen.add(id(m))
        if not isinstance(m, (MaskedLayerBase, TaskBatchNorm)):
            raise SupsupError(f"module '{name}' is a {type(m).__name__}, a task module a bank cannot store; "
                              "banks store MaskedLinear / MaskedConv2d / TaskBatchNorm")
        found.append((name, m))
    if not any(isinstance(m, MaskedLayerBase) for _, m in found):
        raise SupsupError(f"{type(model).__name__} has no masked layers; convert it with convert_(model, config)")
    return found


def _is_masked(m: nn.Module) -> bool:
    from .nn import MaskedLayerBase

    return isinstance(m, MaskedLayerBase)


def _model_tasks(mods: list[tuple[str, nn.Module]]) -> int:
    counts = {name: m.num_tasks for name, m in mods}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{n}={c}" for n, c in counts.items())
        raise SupsupError(f"the model's task layers disagree on the number of frozen tasks: {detail}")
    return next(iter(counts.values()))


def _signs_digest(weight: torch.Tensor) -> str:
    """Digest of a signed-constant base's sign pattern (dtype-independent)."""
    signs = (weight.detach().reshape(-1) > 0).cpu().numpy()
    return _sha256(np.packbits(signs, bitorder="little").tobytes())


def _base_tensors(name: str, m: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen, non-regenerable base state of one module: pretrained weight, biases, norm affine."""
    out = {}
    if _is_masked(m):
        if getattr(m, "base_id", None) is None:
            out[f"{name}/weight"] = m.weight
        if m.bias is not None:
            out[f"{name}/bias"] = m.bias
    else:
        for b in ("weight", "bias"):
            if getattr(m, b, None) is not None:
                out[f"{name}/{b}"] = getattr(m, b)
    return out


def _task_tensor_names(m: nn.Module) -> tuple[str, ...]:
    return ("mask",) if _is_masked(m) else ("running_mean", "running_var")


def _task_tensors(name: str, m: nn.Module, t: int, index: int) -> dict[str, torch.Tensor]:
    """Model task ``t``'s tensors of one module, keyed for bank task ``index``."""
    if _is_masked(m):
        return {f"{index}/{name}/mask": m.bank[t]}
    return {f"{index}/{name}/running_mean": m.running_mean[t], f"{index}/{name}/running_var": m.running_var[t]}


def _config_dict(m: nn.Module) -> dict:
    cfg = getattr(m, "config", None)
    return _check_json("config", dataclasses.asdict(cfg)) if cfg is not None else {}


def _fingerprint(mods: list[tuple[str, nn.Module]]) -> tuple[dict, list]:
    configs: list = []
    layers, norms = [], []
    for name, m in mods:
        if _is_masked(m):
            cfg = _config_dict(m)
            if cfg not in configs:
                configs.append(cfg)
            signed = getattr(m, "base_id", None) is not None
            entry = {
                "name": name,
                "type": type(m).__name__,
                "weight_shape": list(m.weight.shape),
                "packed_shape": list(m.bank.shape[1:]),
                "layer_id": int(m.layer_id),
                "base": "signed_constant" if signed else "pretrained",
                "has_bias": m.bias is not None,
                "config": configs.index(cfg),
            }
            if signed:
                seed, layer_id = (int(v) for v in m.base_id.tolist())
                entry.update(seed=seed, gain=float(m.config.gain), signs_sha256=_signs_digest(m.weight))
            layers.append(entry)
        else:
            norms.append({
                "name": name,
                "type": type(m).__name__,
                "num_features": int(m.num_features),
                "stats_dtype": _dtype_name(m.running_mean.dtype),
                "affine": [b for b in ("weight", "bias") if getattr(m, b, None) is not None],
            })
    return {"layers": layers, "norms": norms}, configs


_LAYER_KEYS = ("name", "type", "weight_shape", "packed_shape", "layer_id", "base", "has_bias", "seed", "gain",
               "signs_sha256")
_NORM_KEYS = ("name", "type", "num_features", "affine")


def _check_fingerprint(saved: dict, model_fp: dict, path: str) -> None:
    """A :class:`BankFileError` naming the first difference between the bank's model and ``model``."""
    for kind, keys in (("layers", _LAYER_KEYS), ("norms", _NORM_KEYS)):
        a, b = saved.get(kind), model_fp[kind]
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
            for k in keys:
                if ea.get(k) != eb.get(k):
                    what = "sign pattern of the signed-constant base" if k == "signs_sha256" else k
                    raise BankFileError(
                        f"{path} belongs to a different model: {kind[:-1]} '{eb['name']}' has {what} "
                        f"{ea.get(k)!r} in the bank and {eb.get(k)!r} in the model"
                    )


# ======================================================================================
# Manifest
# ======================================================================================
def _manifest_bytes(body: dict) -> bytes:
    doc = {"format": FILE_FORMAT, "file_version": FILE_VERSION, "body_sha256": _sha256(_canonical(body).encode()),
           "body": body}
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n").encode()


def _want(d: Any, key: str, typ, where: str, path: str):
    if not isinstance(d, dict) or key not in d:
        raise BankFileError(f"{path}: corrupted manifest: {where} has no '{key}'")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise BankFileError(f"{path}: corrupted manifest: {where}.{key} has type {type(v).__name__}")
    return v


def _read_manifest(directory: str) -> dict:
    mpath = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise BankFileError(f"{directory}: no mask bank here (not a directory)")
    try:
        size = os.path.getsize(mpath)
        if size > MAX_MANIFEST_BYTES:
            raise BankFileError(f"{mpath}: manifest of {size} bytes is larger than any bank's")
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BankFileError(f"{directory}: no mask bank here ({MANIFEST} is missing)") from None
    except OSError as e:
        raise BankFileError(f"{mpath}: cannot read the manifest: {e}") from None
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
        actual = _sha256(_canonical(body).encode())
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
        if not _SHARD_RE.match(fname):
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


def _info(directory: str, body: dict) -> BankInfo:
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


# ======================================================================================
# Shards
# ======================================================================================
def _write_shard(directory: str, fname: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write one safetensors shard atomically; its manifest entry (size, header digest)."""
    from safetensors.torch import save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digests = {k: _tensor_digest(v) for k, v in cpu.items()}
    header_meta = {"bank_id": meta["bank_id"], "file_version": str(FILE_VERSION), "sha256": _canonical(digests)}
    data = save(cpu, metadata=header_meta)
    _atomic_write(os.path.join(directory, fname), data)
    (n,) = struct.unpack("<Q", data[:8])
    return {"nbytes": len(data), "header_sha256": _sha256(data[: 8 + n])}


class _Shard:
    """One verified shard, opened lazily: header checked against the manifest, tensors against the header."""

    def __init__(self, directory: str, fname: str, entry: dict, bank_id: str) -> None:
        self.path = os.path.join(directory, fname)
        try:
            size = os.path.getsize(self.path)
            if size != entry["nbytes"]:
                raise BankFileError(f"{self.path}: truncated or overwritten shard ({size} bytes, the manifest "
                                    f"says {entry['nbytes']})")
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise BankFileError(f"{self.path}: truncated shard (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise BankFileError(f"{self.path}: corrupted shard (header length {n})")
                header = f.read(n)
        except FileNotFoundError:
            raise BankFileError(f"{self.path}: shard named by the manifest is missing") from None
        except OSError as e:
            raise BankFileError(f"{self.path}: cannot read shard: {e}") from None
        if _sha256(head + header) != entry["header_sha256"]:
            raise BankFileError(f"{self.path}: corrupted shard (header checksum mismatch)")
        try:
            hdr = json.loads(header.decode("utf-8"))
            meta = hdr["__metadata__"]
            digests = json.loads(meta["sha256"])
            if not isinstance(hdr, dict) or not isinstance(digests, dict):
                raise TypeError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise BankFileError(f"{self.path}: corrupted shard header ({e})") from None
        if meta.get("bank_id") != bank_id:
            raise BankFileError(f"{self.path}: shard belongs to another bank (id {meta.get('bank_id')!r})")
        self.header = hdr
        self.digests = digests
        self._file = None

    def _open(self):
        if self._file is None:
            from safetensors import safe_open

            try:
                self._file = safe_open(self.path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise BankFileError(f"{self.path}: unreadable shard ({e})") from None
        return self._file

    def get(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """Tensor ``key``, checked for dtype, shape and digest before it is returned."""
        entry = self.header.get(key)
        want_st = next(k for k, v in _ST_DTYPES.items() if _DTYPES[v] == dtype)
        if not isinstance(entry, dict) or key not in self.digests:
            raise BankFileError(f"{self.path}: tensor {key!r} is missing")
        if entry.get("dtype") != want_st or list(entry.get("shape", ())) != list(shape):
            raise BankFileError(f"{self.path}: tensor {key!r} is {entry.get('dtype')} {entry.get('shape')}, "
                                f"expected {want_st} {list(shape)}")
        try:
            t = self._open().get_tensor(key)
        except BankFileError:
            raise
        except Exception as e:
            raise BankFileError(f"{self.path}: cannot read tensor {key!r} ({e})") from None
        if t.dtype != dtype or list(t.shape) != list(shape):
            raise BankFileError(f"{self.path}: tensor {key!r} read as {t.dtype} {list(t.shape)}")
        if _tensor_digest(t) != self.digests[key]:
            raise BankFileError(f"{self.path}: corrupted tensor {key!r} (checksum mismatch)")
        return t

    def close(self) -> None:
        self._file = None


def _layout(body: dict) -> dict[str, list[tuple[str, torch.dtype, tuple]]]:
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
        dt = _DTYPES.get(e.get("stats_dtype"), None)
        if dt is None:
            raise BankFileError(f"corrupted manifest: norm {e.get('name')!r} has stats dtype {e.get('stats_dtype')!r}")
        c = (int(e["num_features"]),)
        out[e["name"]] = [("running_mean", dt, c), ("running_var", dt, c)]
    return out


# ======================================================================================
# Saving
# ======================================================================================
def _prepare_dir(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SupsupError(f"{directory} exists and is not a directory; a bank is a directory")
    if os.path.isdir(directory):
        foreign = [f for f in os.listdir(directory)
                   if f not in (MANIFEST, LOCK) and not _SHARD_RE.match(f) and not _TMP_RE.match(f)]
        if foreign and not os.path.exists(os.path.join(directory, MANIFEST)):
            raise SupsupError(f"{directory} is a non-empty directory that is not a mask bank "
                              f"(holds {sorted(foreign)[:3]}); refusing to write a bank into it")
        return
    parent = os.path.dirname(directory)
    os.makedirs(directory, exist_ok=True)
    _fsync_dir(parent)


def _remove_orphans(directory: str, body: dict) -> None:
    """Delete shards and temp files the new manifest does not name (left by replaced banks or crashes)."""
    keep = set(body["shards"])
    for f in os.listdir(directory):
        if (_SHARD_RE.match(f) and f not in keep) or _TMP_RE.match(f):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, f))


def _check_names(task_names, count: int) -> list:
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
    _check_unique(names)
    return names


def _check_unique(names: list) -> None:
    named = [n for n in names if n is not None]
    if len(set(named)) != len(named):
        dup = sorted({n for n in named if named.count(n) > 1})
        raise SupsupError(f"task names must be unique; repeated: {dup[:5]}")


def _check_task_metadata(task_metadata, count: int) -> list:
    if task_metadata is None:
        return [{} for _ in range(count)]
    if not isinstance(task_metadata, Sequence) or isinstance(task_metadata, (str, dict)):
        raise SupsupError(f"task_metadata must be a sequence of dicts, got {type(task_metadata).__name__}")
    if len(task_metadata) != count:
        raise SupsupError(f"task_metadata has {len(task_metadata)} entries, the model holds {count} frozen tasks")
    return [_check_dict(f"task_metadata[{i}]", m) for i, m in enumerate(task_metadata)]


def _check_dict(what: str, d) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SupsupError(f"{what} must be a dict, got {type(d).__name__}")
    return _check_json(what, d)


def _no_open_task(mods, what: str) -> None:
    open_ = [n for n, m in mods if m.in_training]
    if open_:
        raise SupsupError(f"{what}: a task is in training in {open_[:3]}; freeze_task(model) first")


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

    Replacing a bank deletes its old shards once the new manifest is in place: an open
    :class:`LazyBank` of the old bank keeps the shards it has open and must :meth:`LazyBank.refresh`.
    """
    directory = _as_path(path)
    mods = _task_modules(model)
    count = _model_tasks(mods)
    names = _check_names(task_names, count)
    tmeta = _check_task_metadata(task_metadata, count)
    meta = _check_dict("metadata", metadata)
    fingerprint, configs = _fingerprint(mods)
    _prepare_dir(directory)
    with _writer_lock(directory):
        body = {
            "bank_id": secrets.token_hex(16),
            "format_version": FORMAT_VERSION,
            "word_bits": WORD_BITS,
            "library_version": _library_version(),
            "created_unix": time.time(),
            "configs": configs,
            "fingerprint": fingerprint,
            "metadata": meta,
            "shards": {},
            "base_shard": None,
            "tasks": [],
        }
        base = {}
        for name, m in mods:
            base.update(_base_tensors(name, m))
        if base:
            fname = f"base-{secrets.token_hex(8)}.safetensors"
            body["shards"][fname] = _write_shard(directory, fname, base, body)
            body["base_shard"] = fname
        per_task = sum(m.bank[0].numel() * 4 if _is_masked(m) else 2 * m.num_features * m.running_mean.element_size()
                       for _, m in mods) if count else 0
        group = max(1, SHARD_BYTES // max(per_task, 1))
        for first in range(0, count, group):
            tasks = range(first, min(count, first + group))
            tensors = {}
            for t in tasks:
                for name, m in mods:
                    tensors.update(_task_tensors(name, m, t, t))
            fname = f"tasks-{first:06d}-{secrets.token_hex(8)}.safetensors"
            body["shards"][fname] = _write_shard(directory, fname, tensors, body)
            body["tasks"].extend({"name": names[t], "metadata": tmeta[t], "shard": fname} for t in tasks)
        _fsync_dir(directory)
        _atomic_write(os.path.join(directory, MANIFEST), _manifest_bytes(body))
        _remove_orphans(directory, body)
    return _info(directory, body)


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
    directory = _as_path(path)
    mods = _task_modules(model)
    count = _model_tasks(mods)
    from .nn.base import _as_task_id

    t = _as_task_id(task)
    if not 0 <= t < count:
        raise SupsupError(f"append_task: task {t} is not a frozen task of the model (num_tasks={count})")
    if name is not None and not isinstance(name, str):
        raise SupsupError(f"append_task: name must be a str, got {name!r}")
    meta = _check_dict("metadata", metadata)
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        if t != 0:
            raise BankFileError(f"{directory}: no mask bank here to append task {t} to (save_bank first, "
                                "or append task 0 to start one)")
        _prepare_dir(directory)
        with _writer_lock(directory):
            if not os.path.exists(os.path.join(directory, MANIFEST)):
                _save_empty(mods, directory)
    fingerprint, _ = _fingerprint(mods)
    with _writer_lock(directory):
        body = _read_manifest(directory)
        _check_fingerprint(body["fingerprint"], fingerprint, directory)
        have = len(body["tasks"])
        if have != t:
            raise SupsupError(f"append_task: the bank at {directory} holds {have} tasks, so the next task to append "
                              f"is model task {have}, not {t}")
        _check_unique([e.get("name") for e in body["tasks"]] + [name])
        tensors = {}
        for mname, m in mods:
            tensors.update(_task_tensors(mname, m, t, t))
        fname = f"tasks-{t:06d}-{secrets.token_hex(8)}.safetensors"
        body["shards"][fname] = _write_shard(directory, fname, tensors, body)
        body["tasks"].append({"name": name, "metadata": meta, "shard": fname})
        _fsync_dir(directory)
        _atomic_write(os.path.join(directory, MANIFEST), _manifest_bytes(body))
    return _info(directory, body)


def _save_empty(mods, directory: str) -> None:
    """A bank of the model's base and no tasks (the start of a bank grown by appends)."""
    fingerprint, configs = _fingerprint(mods)
    body = {
        "bank_id": secrets.token_hex(16), "format_version": FORMAT_VERSION, "word_bits": WORD_BITS,
        "library_version": _library_version(), "created_unix": time.time(), "configs": configs,
        "fingerprint": fingerprint, "metadata": {}, "shards": {}, "base_shard": None, "tasks": [],
    }
    base = {}
    for name, m in mods:
        base.update(_base_tensors(name, m))
    if base:
        fname = f"base-{secrets.token_hex(8)}.safetensors"
        body["shards"][fname] = _write_shard(directory, fname, base, body)
        body["base_shard"] = fname
    _fsync_dir(directory)
    _atomic_write(os.path.join(directory, MANIFEST), _manifest_bytes(body))


def _library_version() -> str:
    from . import __version__

    return __version__


# ======================================================================================
# Loading
# ======================================================================================
def read_bank_info(path: PathLike) -> BankInfo:
    """The verified manifest of the bank at ``path`` (no tensor is read)."""
    directory = _as_path(path)
    return _info(directory, _read_manifest(directory))


def verify_bank(path: PathLike) -> BankInfo:
    """Read and check every tensor of the bank at ``path``; a :class:`BankFileError` on the first bad one."""
    directory = _as_path(path)
    body = _read_manifest(directory)
    layout = _layout(body)
    shards = {}
    try:
        for i, t in enumerate(body["tasks"]):
            sh = shards.get(t["shard"])
            if sh is None:
                sh = shards[t["shard"]] = _Shard(directory, t["shard"], body["shards"][t["shard"]], body["bank_id"])
            for mname, fields in layout.items():
                for f, dt, shape in fields:
                    sh.get(f"{i}/{mname}/{f}", dt, shape)
        if body.get("base_shard"):
            fname = body["base_shard"]
            sh = _Shard(directory, fname, body["shards"][fname], body["bank_id"])
            for key in sh.digests:
                e = sh.header.get(key, {})
                dt = _DTYPES.get(_ST_DTYPES.get(e.get("dtype")))
                if dt is None:
                    raise BankFileError(f"{sh.path}: tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
                sh.get(key, dt, e.get("shape", ()))
    finally:
        for sh in shards.values():
            sh.close()
    return _info(directory, body)


def _unique(items: list) -> list:
    if len(set(map(repr, items))) != len(items):
        raise SupsupError(f"tasks lists a task twice: {items}")
    return items


def _resolve_task(t, count: int, path: str, names: Optional[list] = None) -> int:
    if isinstance(t, str):
        if names is None or t not in names:
            raise SupsupError(f"bank {path} has no task named {t!r}")
        return names.index(t)
    from .nn.base import _as_task_id

    i = _as_task_id(t)
    if not 0 <= i < count:
        raise SupsupError(f"task {i} out of range: bank {path} holds tasks 0..{count - 1} ({count} tasks)")
    return i


def _model_device(mods) -> torch.device:
    return mods[0][1].weight.device if _is_masked(mods[0][1]) else mods[0][1].running_mean.device


def _restore_base(mods, directory: str, body: dict) -> None:
    want = {}
    for name, m in mods:
        want.update(_base_tensors(name, m))
    fname = body.get("base_shard")
    have = set()
    sh = None
    if fname is not None:
        sh = _Shard(directory, fname, body["shards"][fname], body["bank_id"])
        have = set(sh.digests)
    if set(want) != have:
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        raise BankFileError(f"{directory} belongs to a different model: base tensors missing from the bank "
                            f"{missing[:4]}, in the bank but not in the model {extra[:4]}")
    if sh is None:
        return
    loaded = {}
    for key, target in want.items():
        e = sh.header.get(key, {})
        dt = _DTYPES.get(_ST_DTYPES.get(e.get("dtype")))
        if dt is None:
            raise BankFileError(f"{sh.path}: base tensor {key!r} has unsupported dtype {e.get('dtype')!r}")
        loaded[key] = sh.get(key, dt, tuple(target.shape))
    sh.close()
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
) -> Union[BankInfo, "LazyBank"]:
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
    directory = _as_path(path)
    mods = _task_modules(model)
    _no_open_task(mods, "load_bank")
    body = _read_manifest(directory)
    fingerprint, _ = _fingerprint(mods)
    _check_fingerprint(body["fingerprint"], fingerprint, directory)
    mdev = _model_device(mods)
    if lazy:
        if tasks is not None:
            raise SupsupError("load_bank: tasks= selects what an eager load installs; a LazyBank reads any task "
                              "on demand (use LazyBank.activate(model, tasks))")
        bank = LazyBank(directory, device=mdev if device is None else device, cache_bytes=cache_bytes, _body=body)
        _restore_base(mods, directory, body)
        bank._remember_fingerprint(model, mods, fingerprint)
        return bank
    if device is not None and torch.device(device) != mdev:
        raise SupsupError(f"load_bank: the model is on {mdev}, not {device}; move it with model.to(device) first")
    names = [t.get("name") for t in body["tasks"]]
    count = len(body["tasks"])
    if tasks is None:
        order = list(range(count))
    else:
        if isinstance(tasks, (int, str)) or not isinstance(tasks, Iterable):
            raise SupsupError(f"tasks must be a sequence of task indices or names, got {tasks!r}")
        order = [_resolve_task(t, count, directory, names) for t in tasks]
        if len(set(order)) != len(order):
            raise SupsupError(f"tasks lists a task twice: {list(tasks)}")
    for name, m in mods:
        if m.max_tasks is not None and len(order) > m.max_tasks:
            raise SupsupError(f"load_bank: loading {len(order)} tasks into '{name}', which allows max_tasks="
                              f"{m.max_tasks}")
    layout = _layout(body)
    stacks = {name: {f: torch.empty((len(order),) + shape, dtype=dt) for f, dt, shape in layout[name]}
              for name, _ in mods}
    shards: dict[str, _Shard] = {}
    try:
        for i, bt in enumerate(order):
            fname = body["tasks"][bt]["shard"]
            sh = shards.get(fname)
            if sh is None:
                sh = shards[fname] = _Shard(directory, fname, body["shards"][fname], body["bank_id"])
            for name, _ in mods:
                for f, dt, shape in layout[name]:
                    stacks[name][f][i] = sh.get(f"{bt}/{name}/{f}", dt, shape)
    finally:
        for sh in shards.values():
            sh.close()
    _restore_base(mods, directory, body)
    with torch.no_grad():
        for name, m in mods:
            _install(m, {f: v.to(mdev) for f, v in stacks[name].items()})
    info = _info(directory, body)
    info.loaded_tasks = order
    return info


def _install(m: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` (``[T, ...]`` per field) the module's frozen tasks and select the last one."""
    if _is_masked(m):
        m.bank = tensors["mask"].to(torch.int32)
    else:
        dt = m.running_mean.dtype
        m.running_mean = tensors["running_mean"].to(dt)
        m.running_var = tensors["running_var"].to(dt)
    m._mode_after_load()  # the same state a loaded state dict leaves: last frozen task selected


# ======================================================================================
# Lazy, memory-mapped access for banks larger than memory
# ======================================================================================
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
        self.path = _as_path(path)
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise SupsupError(f"LazyBank: bad device {device!r} ({e})") from None
        self.cache_bytes = int(cache_bytes)
        self._body = _read_manifest(self.path) if _body is None else _body
        self._layout = _layout(self._body)
        self._shards: "OrderedDict[str, _Shard]" = OrderedDict()
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
        return _info(self.path, self._body)

    @property
    def cached_tasks(self) -> list[int]:
        """Cached task indices, least recently used first."""
        return list(self._cache)

    @property
    def cached_bytes(self) -> int:
        return self._cached

    def refresh(self) -> int:
        """Re-read the manifest (to see tasks appended since opening); returns ``num_tasks``."""
        body = _read_manifest(self.path)
        if body["bank_id"] != self._body["bank_id"] or body["fingerprint"] != self._body["fingerprint"]:
            self.close()  # the bank was replaced: nothing cached belongs to it any more
        self._body, self._layout = body, _layout(body)
        return self.num_tasks

    # ---- reading ------------------------------------------------------------------------
    def _shard(self, fname: str) -> _Shard:
        sh = self._shards.get(fname)
        if sh is None:
            sh = _Shard(self.path, fname, self._body["shards"][fname], self._body["bank_id"])
            self._shards[fname] = sh
            while len(self._shards) > 64:  # bound open file handles
                self._shards.popitem(last=False)[1].close()
        else:
            self._shards.move_to_end(fname)
        return sh

    def task(self, task: Union[int, str]) -> dict[str, dict[str, torch.Tensor]]:
        """Task ``task``'s tensors on ``device``: ``{module name: {"mask" | "running_mean" | ...: tensor}}``."""
        i = _resolve_task(task, self.num_tasks, self.path, self.task_names)
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
        mods = _task_modules(model)
        _no_open_task(mods, "LazyBank.activate")
        fp = self._fingerprint_for(model, mods)
        _check_fingerprint(self._body["fingerprint"], fp, self.path)
        many = not isinstance(task, (int, str, torch.Tensor))
        items = list(task) if many else [task]
        if not items:
            raise SupsupError("LazyBank.activate: no task given")
        idx = _unique([_resolve_task(t, self.num_tasks, self.path, self.task_names) for t in items])
        per_task = [self.task(i) for i in idx]
        mdev = _model_device(mods)
        with torch.no_grad():
            for name, m in mods:
                fields = self._layout[name]
                # stacked copies: the model may write into its bank, the cache must stay pristine
                _install(m, {f: torch.stack([pt[name][f] for pt in per_task]).to(mdev) for f, _, _ in fields})

    @staticmethod
    def _model_key(mods) -> list:
        # a tensor's _version counts in-place writes: a changed base weight changes the key
        return [(name, id(m), m.weight.data_ptr(), m.weight._version) if _is_masked(m) else (name, id(m))
                for name, m in mods]

    def _remember_fingerprint(self, model: nn.Module, mods, fp: dict) -> None:
        self._fp_cache = (weakref.ref(model), self._model_key(mods), fp)

    def _fingerprint_for(self, model: nn.Module, mods) -> dict:
        # hashing every base's signs on each activate would dominate serving: recompute only
        # when a module or a base weight changed
        cached = self._fp_cache
        if cached is not None and cached[0]() is model and cached[1] == self._model_key(mods):
            return cached[2]
        fp, _ = _fingerprint(mods)
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


__all__ = [
    "FILE_FORMAT", "FILE_VERSION", "BankInfo", "LazyBank", "save_bank", "append_task", "load_bank",
    "read_bank_info", "verify_bank",
]
