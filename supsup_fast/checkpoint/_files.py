"""The files of a bank directory and how they are written: names, digests, atomic replacement, the writer lock.

Nothing here knows what a manifest or a shard holds; it knows which file names belong to a bank,
how a file is replaced all-or-nothing, how writers take turns, and how a bank's files are opened:
regular files only (a FIFO, a device or a symbolic link in a bank is refused, never opened or
followed) and read by position from one descriptor (:func:`pread_into`), never memory-mapped, so a
file changed or truncated in place gives a short read or a digest mismatch, not a signal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import warnings
from typing import Any, Iterator, Optional, Union

from ..errors import BankDurabilityWarning, BankFileError, SupsupError

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
#: Previous manifests kept while a reader may still hold them (see ``_generations``).
PREV_RE = re.compile(r"^\.manifest\.json\.[0-9a-f]{16}\.prev$")

# Opening never blocks (a FIFO opens at once, then fails the regular-file check) and never follows
# a symbolic link; O_NOFOLLOW applies to the last component only, so the bank directory itself may
# be reached through a link.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | _CLOEXEC | getattr(os, "O_BINARY", 0)

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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str, what: str) -> int:
    """A read-only descriptor of the regular file ``path``; a :class:`BankFileError` for anything else.

    A missing file raises :class:`FileNotFoundError` (callers name what is missing).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            raise BankFileError(f"{path}: {what} is a symbolic link; a bank's files are regular files") from None
        raise BankFileError(f"{path}: cannot open {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise BankFileError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BankFileError(f"{path}: {what} is a {_kind(st.st_mode)}, not a regular file")
    return fd


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read ``len(buf)`` bytes at ``offset`` into ``buf``; the number read (less only at end of file)."""
    got, want = 0, len(buf)
    while got < want:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [buf[got:]], offset + got)
        else:  # pragma: no cover - platforms without preadv (pread) or without positional reads at all
            if hasattr(os, "pread"):
                chunk = os.pread(fd, want - got, offset + got)
            else:
                os.lseek(fd, offset + got, os.SEEK_SET)
                chunk = os.read(fd, want - got)
            n = len(chunk)
            buf[got:got + n] = chunk
        if n == 0:
            break
        got += n
    return got


def pread_exact(fd: int, nbytes: int, offset: int, path: str, what: str) -> bytes:
    """``nbytes`` bytes at ``offset``; a :class:`BankFileError` if the file ends before them."""
    buf = bytearray(nbytes)
    try:
        got = pread_into(fd, memoryview(buf), offset)
    except OSError as e:
        raise BankFileError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if got != nbytes:
        raise BankFileError(f"{path}: truncated {what} (file ends {nbytes - got} bytes early)")
    return bytes(buf)


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


def atomic_write(path: str, data, *, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data`` all-or-nothing: temp file, fsync, rename, fsync of the directory.

    An error before the rename removes the temp file and is raised: ``path`` is unchanged. After the
    rename the change is made; a failed directory fsync then only warns
    (:class:`~supsup_fast.errors.BankDurabilityWarning`) instead of reporting a change that happened
    as a failure. ``sync_dir=False`` leaves the directory fsync to the caller (a save fsyncs it once
    for all its shards before the manifest names them).
    """
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | getattr(os, "O_BINARY", 0),
                     0o644)
        with os.fdopen(fd, "wb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        try:
            fsync_dir(d)
        except OSError as e:
            warnings.warn(BankDurabilityWarning(
                f"{path} was written and is in place, but fsync of its directory failed ({e.strerror or e}): "
                "the change is visible now and may not survive a power failure"), stacklevel=3)


@contextlib.contextmanager
def writer_lock(directory: str) -> Iterator[None]:
    """One writer at a time: two concurrent appends would otherwise both write task ``T``."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = os.path.join(directory, LOCK)
    try:  # never follow a link (it would create or lock a file outside the bank), never block on a FIFO
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise BankFileError(f"{path}: the writer lock is a symbolic link; a bank's files are regular "
                                "files") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BankFileError(f"{path}: the writer lock is a {_kind(st.st_mode)}, not a regular file")
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
        foreign = [f for f in os.listdir(directory) if not is_bank_file(f)]
        if foreign and not os.path.exists(os.path.join(directory, MANIFEST)):
            raise SupsupError(f"{directory} is a non-empty directory that is not a mask bank "
                              f"(holds {sorted(foreign)[:3]}); refusing to write a bank into it")
        return
    parent = os.path.dirname(directory)
    os.makedirs(directory, exist_ok=True)
    fsync_dir(parent)


def is_bank_file(name: str) -> bool:
    """Whether ``name`` is a file name a bank directory holds."""
    return name in (MANIFEST, LOCK) or bool(SHARD_RE.match(name) or TMP_RE.match(name) or PREV_RE.match(name))


def remove_orphans(directory: str, keep: set) -> None:
    """Delete the shards not in ``keep`` and every temp file (left by replaced banks or crashes).

    The caller holds the writer lock and knows that no reader needs a shard outside ``keep``.
    """
    for f in os.listdir(directory):
        if (SHARD_RE.match(f) and f not in keep) or TMP_RE.match(f):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, f))


def remove_quietly(directory: str, names) -> None:
    """Delete ``names`` from ``directory``, ignoring files already gone (cleanup after a failed write)."""
    for f in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, f))
