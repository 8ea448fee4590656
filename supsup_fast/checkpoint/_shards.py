"""Shards: the safetensors files holding a bank's tensors, written atomically and verified when read.

A shard's header metadata carries the bank id, the bank layout version and the SHA-256 of every
tensor's raw bytes; the manifest carries each shard's size and the digest of its header. A shard
is checked against its manifest entry when opened, and each tensor against its digest when read.

Shards are written with ``safetensors`` but read here, by position from one open descriptor, into
memory the caller owns: safetensors' readers memory-map the file, and through a mapping a shard
truncated in place kills the process (``SIGBUS``) and one overwritten in place changes bytes that
were already verified. The format read is the safetensors layout (8-byte little-endian header
length, JSON header, tensors' bytes), checked as safetensors checks it before any tensor is read:
every tensor's offsets lie in the file, match its shape and dtype, and the tensors tile the data
region exactly, so what a header promises is bounded by the file's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Sequence

import torch
from safetensors.torch import save

from ..errors import BankFileError
from ._files import atomic_write, canonical_json, open_regular, pread_exact, pread_into, sha256_hex
from ._manifest import DTYPES, FILE_VERSION

#: A save splits its tasks into shards of about this many bytes.
SHARD_BYTES = 64 << 20
#: A safetensors header larger than this is not read.
MAX_HEADER_BYTES = 256 << 20

#: safetensors' dtype names -> the bank's (:data:`~._manifest.DTYPES`).
ST_DTYPES = {"I32": "int32", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ITEMSIZE = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}

if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian bytes, read as they are
    raise ImportError("supsup_fast mask banks are read on little-endian hosts only")


class MissingShardError(BankFileError):
    """A shard the manifest names is not in the bank directory (the bank may have been replaced)."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    return sha256_hex(tensor_bytes(t))


def write_shard(directory: str, fname: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write one safetensors shard atomically; its manifest entry (size, header digest).

    The directory is not fsynced here: the caller does it once, before a manifest names the shard.
    """
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digests = {k: tensor_digest(v) for k, v in cpu.items()}
    header_meta = {"bank_id": meta["bank_id"], "file_version": str(FILE_VERSION), "sha256": canonical_json(digests)}
    data = save(cpu, metadata=header_meta)
    atomic_write(os.path.join(directory, fname), data, sync_dir=False)
    (n,) = struct.unpack("<Q", data[:8])
    return {"nbytes": len(data), "header_sha256": sha256_hex(data[: 8 + n])}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layout(hdr: dict, data_len: int, path: str) -> None:
    """The safetensors rules, before anything is read: known dtypes, offsets inside the data region
    that match each shape, tensors tiling the region with no gap or overlap."""
    spans = []
    for key, e in hdr.items():
        if key == "__metadata__":
            continue
        if not isinstance(e, dict) or not isinstance(e.get("shape"), list) \
                or not isinstance(e.get("data_offsets"), list):
            raise BankFileError(f"{path}: corrupted shard header (entry {key!r} is malformed)")
        st = e.get("dtype")
        if st not in _ITEMSIZE:
            raise BankFileError(f"{path}: tensor {key!r} has unsupported dtype {st!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not all(_is_count(d) for d in shape) or len(offs) != 2 or not all(_is_count(o) for o in offs):
            raise BankFileError(f"{path}: corrupted shard header (entry {key!r}: shape {shape}, offsets {offs})")
        start, end = offs
        if not start <= end <= data_len or end - start != math.prod(shape) * _ITEMSIZE[st]:
            raise BankFileError(f"{path}: corrupted shard header (tensor {key!r} {st} {shape} at bytes {start}..{end} "
                                f"of a {data_len}-byte data region)")
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise BankFileError(f"{path}: corrupted shard header (tensors overlap or leave a gap at byte {pos})")
        pos = end
    if pos != data_len:
        raise BankFileError(f"{path}: corrupted shard header ({data_len - pos} bytes after the last tensor)")


class Shard:
    """Shard ``fname`` of the bank whose manifest body is ``body``, opened now and held open: its size and
    header checked against the manifest now, each tensor against its digest when read.

    The descriptor stays on the file that was verified, so a shard replaced or deleted after opening
    is still read whole; :meth:`close` releases it.
    """

    def __init__(self, directory: str, body: dict, fname: str) -> None:
        entry, bank_id = body["shards"][fname], body["bank_id"]
        self.path = os.path.join(directory, fname)
        try:
            fd = open_regular(self.path, "shard")
        except FileNotFoundError:
            raise MissingShardError(f"{self.path}: shard named by the manifest is missing") from None
        try:
            self._read_header(fd, entry, bank_id)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _read_header(self, fd: int, entry: dict, bank_id: str) -> None:
        size = os.fstat(fd).st_size
        if size != entry["nbytes"]:
            raise BankFileError(f"{self.path}: truncated or overwritten shard ({size} bytes, the manifest "
                                f"says {entry['nbytes']})")
        if size < 8:
            raise BankFileError(f"{self.path}: truncated shard (no header)")
        head = pread_exact(fd, 8, 0, self.path, "shard header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise BankFileError(f"{self.path}: corrupted shard (header length {n})")
        header = pread_exact(fd, n, 8, self.path, "shard header")
        if sha256_hex(head + header) != entry["header_sha256"]:
            raise BankFileError(f"{self.path}: corrupted shard (header checksum mismatch)")
        try:
            hdr = json.loads(header.decode("utf-8"))
            if not isinstance(hdr, dict):
                raise TypeError("header is not a JSON object")
            meta = hdr["__metadata__"]
            digests = json.loads(meta["sha256"])
            if not isinstance(digests, dict):
                raise TypeError("digests are not a JSON object")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise BankFileError(f"{self.path}: corrupted shard header ({e})") from None
        if meta.get("bank_id") != bank_id:
            raise BankFileError(f"{self.path}: shard belongs to another bank (id {meta.get('bank_id')!r})")
        _check_layout(hdr, size - 8 - n, self.path)
        self.header = hdr
        self.digests = digests
        self._data_start = 8 + n

    def stored_dtype(self, key: str, what: str = "tensor") -> torch.dtype:
        """The dtype the header gives tensor ``key``; a :class:`BankFileError` if a bank cannot hold it."""
        e = self.header.get(key, {})
        dt = DTYPES.get(ST_DTYPES.get(e.get("dtype")))
        if dt is None:
            raise BankFileError(f"{self.path}: {what} {key!r} has unsupported dtype {e.get('dtype')!r}")
        return dt

    def check(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> tuple[int, int]:
        """Where tensor ``key`` lies (file offsets), after checking the header holds it with this dtype and
        shape; reads nothing, so a load can check every tensor it needs before it allocates anything."""
        entry = self.header.get(key)
        want_st = next(k for k, v in ST_DTYPES.items() if DTYPES[v] == dtype)
        if key == "__metadata__" or not isinstance(entry, dict) or key not in self.digests:
            raise BankFileError(f"{self.path}: tensor {key!r} is missing")
        if entry.get("dtype") != want_st or list(entry.get("shape", ())) != list(shape):
            raise BankFileError(f"{self.path}: tensor {key!r} is {entry.get('dtype')} {entry.get('shape')}, "
                                f"expected {want_st} {list(shape)}")
        start, end = entry["data_offsets"]
        return self._data_start + start, self._data_start + end

    def get(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """Tensor ``key`` in fresh memory, checked for dtype, shape and digest before it is returned."""
        start, end = self.check(key, dtype, shape)
        if self._fd is None:
            raise BankFileError(f"{self.path}: shard was closed")
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        try:
            got = pread_into(self._fd, view, start)
        except OSError as e:
            raise BankFileError(f"{self.path}: cannot read tensor {key!r} ({e.strerror or e})") from None
        if got != end - start:
            raise BankFileError(f"{self.path}: truncated shard (tensor {key!r} ends past the end of the file)")
        if sha256_hex(view) != self.digests[key]:
            raise BankFileError(f"{self.path}: corrupted tensor {key!r} (checksum mismatch)")
        return buf.view(dtype).reshape(tuple(shape))

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:  # pragma: no cover - interpreter shutdown
            pass
