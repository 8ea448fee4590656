"""The files of a bank directory and how they are written: names, digests, atomic replacement, the writer lock.

Nothing here knows what a manifest or a shard holds; it knows which file names belong to a bank,
how a file is replaced all-or-nothing, and how writers take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from typing import Any, Iterator, Optional, Union

from ..errors import SupsupError

try:  # POSIX advisory locks serialise writers; elsewhere a single writer is the caller's duty
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MANIFEST = "manifest.json"
LOCK = ".lock"

#: Shard file names: ``base-<token>.safetensors`` and ``tasks-<first task>-<token>.safetensors``.
SHARD_RE = re.compile(r"^(?:tasks-\d{6,}|base)-[0-9a-f]{16}\.safetensors$")
#: Temporary files of :func:`atomic_write` (left behind only by a crash).
TMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")

PathLike = Union[str, "os.PathLike[str]"]


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """The one JSON spelling of ``obj`` that digests are taken over (sorted keys, no whitespace, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def check_json(what: str, value: Any) -> Any:
    """``value`` as JSON round-trips it; a :class:`SupsupError` if it cannot be stored as JSON."""
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as e:
        raise SupsupError(f"{what} must be JSON-serialisable (str keys, no NaN/inf): {e}") from None


def as_path(path: PathLike, what: str = "path") -> str:
    """``path`` as an absolute ``str``; a :class:`SupsupError` if it is not a non-empty path."""
    if not isinstance(path, (str, os.PathLike)):
        raise SupsupError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise SupsupError(f"{what} must be a non-empty path, got {path!r}")
    return os.path.abspath(p)


def shard_name(first_task: Optional[int]) -> str:
    """A fresh shard file name: the base shard for ``None``, else a shard starting at task ``first_task``."""
    if first_task is None:
        return f"base-{secrets.token_hex(8)}.safetensors"
    return f"tasks-{first_task:06d}-{secrets.token_hex(8)}.safetensors"


def fsync_dir(path: str) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(f, data) -> None:
    """Write ``data`` to ``f`` (a separate function so tests can interrupt a write midway)."""
    f.write(data)


def atomic_write(path: str, data) -> None:
    """Replace ``path`` by ``data`` all-or-nothing: temp file, fsync, rename, fsync of the directory."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


@contextlib.contextmanager
def writer_lock(directory: str) -> Iterator[None]:
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


def prepare_dir(directory: str) -> None:
    """Make ``directory`` ready to hold a bank; refuse a file, or a directory holding something else."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SupsupError(f"{directory} exists and is not a directory; a bank is a directory")
    if os.path.isdir(directory):
        foreign = [f for f in os.listdir(directory)
                   if f not in (MANIFEST, LOCK) and not SHARD_RE.match(f) and not TMP_RE.match(f)]
        if foreign and not os.path.exists(os.path.join(directory, MANIFEST)):
            raise SupsupError(f"{directory} is a non-empty directory that is not a mask bank "
                              f"(holds {sorted(foreign)[:3]}); refusing to write a bank into it")
        return
    parent = os.path.dirname(directory)
    os.makedirs(directory, exist_ok=True)
    fsync_dir(parent)


def remove_orphans(directory: str, keep: set) -> None:
    """Delete the shards not in ``keep`` and every temp file (left by replaced banks or crashes)."""
    for f in os.listdir(directory):
        if (SHARD_RE.match(f) and f not in keep) or TMP_RE.match(f):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, f))
