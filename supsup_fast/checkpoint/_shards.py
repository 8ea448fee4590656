"""Shards: the safetensors files holding a bank's tensors, written atomically and verified when read.

A shard's header metadata carries the bank id, the bank layout version and the SHA-256 of every
tensor's raw bytes; the manifest carries each shard's size and the digest of its header. A shard
is checked against its manifest entry when opened, and each tensor against its digest when read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import BankFileError
from ._files import atomic_write, canonical_json, sha256_hex
from ._manifest import DTYPES, FILE_VERSION

#: A save splits its tasks into shards of about this many bytes.
SHARD_BYTES = 64 << 20
#: A safetensors header larger than this is not read.
MAX_HEADER_BYTES = 256 << 20

#: safetensors' dtype names -> the bank's (:data:`~._manifest.DTYPES`).
ST_DTYPES = {"I32": "int32", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    return sha256_hex(tensor_bytes(t))


def write_shard(directory: str, fname: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write one safetensors shard atomically; its manifest entry (size, header digest)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digests = {k: tensor_digest(v) for k, v in cpu.items()}
    header_meta = {"bank_id": meta["bank_id"], "file_version": str(FILE_VERSION), "sha256": canonical_json(digests)}
    data = save(cpu, metadata=header_meta)
    atomic_write(os.path.join(directory, fname), data)
    (n,) = struct.unpack("<Q", data[:8])
    return {"nbytes": len(data), "header_sha256": sha256_hex(data[: 8 + n])}


class Shard:
    """Shard ``fname`` of the bank whose manifest body is ``body``, opened lazily: its header checked
    against the manifest now, each tensor against the header when read."""

    def __init__(self, directory: str, body: dict, fname: str) -> None:
        entry, bank_id = body["shards"][fname], body["bank_id"]
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
        if sha256_hex(head + header) != entry["header_sha256"]:
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
            try:
                self._file = safe_open(self.path, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise BankFileError(f"{self.path}: unreadable shard ({e})") from None
        return self._file

    def stored_dtype(self, key: str, what: str = "tensor") -> torch.dtype:
        """The dtype the header gives tensor ``key``; a :class:`BankFileError` if a bank cannot hold it."""
        e = self.header.get(key, {})
        dt = DTYPES.get(ST_DTYPES.get(e.get("dtype")))
        if dt is None:
            raise BankFileError(f"{self.path}: {what} {key!r} has unsupported dtype {e.get('dtype')!r}")
        return dt

    def get(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """Tensor ``key``, checked for dtype, shape and digest before it is returned."""
        entry = self.header.get(key)
        want_st = next(k for k, v in ST_DTYPES.items() if DTYPES[v] == dtype)
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
        if tensor_digest(t) != self.digests[key]:
            raise BankFileError(f"{self.path}: corrupted tensor {key!r} (checksum mismatch)")
        return t

    def close(self) -> None:
        self._file = None
