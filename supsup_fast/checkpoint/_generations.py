"""Readers and a writer that replaces the bank: every reader sees one complete version of the bank.

Each manifest file is one *generation* of the bank: the shards it names never change. A save
replaces ``manifest.json`` and then deletes the shards only the old generation named; a reader that
had read the old manifest but not yet opened its shards would find them gone. So:

* a **reader** opens ``manifest.json`` and takes a shared ``flock`` on it (:func:`open_generation`):
  its *lease* on that generation, held until every shard it needs is open (an eager load) or for its
  whole life (a :class:`~supsup_fast.checkpoint.LazyBank`, which reads shards on demand). A reader
  whose manifest was retired between its ``open`` and its lock (its link count is 0) opens again.
* a **writer** (holding the writer lock) hard-links the current manifest to
  ``.manifest.json.<token>.prev`` before replacing it (:func:`keep_current`), so the old generation
  keeps a name. After the new manifest is in place it :func:`retire`-s every kept generation no
  reader holds (an exclusive, non-blocking ``flock`` succeeds: it unlinks it) and deletes only the
  shards that neither the new manifest nor a still-held generation names.

Leases cost one ``open`` and one ``flock`` per open bank and block nobody: a writer never waits for
readers (held generations are simply kept, and retired by a later write once released), and a
reader waits for a writer only for the moment it retires that very generation. Locks die with
their process, so a killed reader leaves nothing to clean up by hand. Where ``flock`` or hard links
are unavailable (Windows, some network file systems) generations are not kept; readers then fall
back on re-reading a manifest that changed under them (:func:`read_consistently`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections import OrderedDict
from typing import Callable, Optional, TypeVar

from ..errors import BankFileError
from ._files import MANIFEST, PREV_RE, fcntl, open_regular, remove_orphans
from ._manifest import open_manifest, read_open_manifest
from ._shards import MissingShardError, Shard

#: How long a reader keeps trying to get a generation that is not being retired under it.
OPEN_TIMEOUT_S = 30.0
#: How many times a reader re-reads a manifest that changed while it opened the shards it names.
OPEN_RETRIES = 16
#: A reader keeps at most this many shards open at once.
MAX_OPEN_SHARDS = 64

T = TypeVar("T")


class Lease:
    """A reader's shared lock on one manifest generation (see the module doc); released by :meth:`close`."""

    def __init__(self, fd: Optional[int]) -> None:
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases its flock

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def _try_lock(fd: int, kind: int) -> Optional[bool]:
    """``True`` if locked, ``False`` if another holder conflicts, ``None`` if the file system cannot lock."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def open_generation(directory: str) -> tuple[dict, Lease]:
    """The verified body of the current manifest and a :class:`Lease` on it."""
    deadline = time.monotonic() + OPEN_TIMEOUT_S
    while True:
        fd = open_manifest(directory)
        try:
            locked = _try_lock(fd, fcntl.LOCK_SH) if fcntl is not None else None
            if locked is False or (locked and os.fstat(fd).st_nlink == 0):
                # a writer is retiring this very generation, or just has: read the new manifest
                os.close(fd)
                fd = None
                if time.monotonic() > deadline:
                    raise BankFileError(f"{directory}: the manifest kept changing for {OPEN_TIMEOUT_S:.0f} s "
                                        "while being read")
                time.sleep(0.001)
                continue
            body = read_open_manifest(fd, os.path.join(directory, MANIFEST))
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if locked:
            return body, Lease(fd)
        os.close(fd)  # no locks on this file system: no lease (see the module doc)
        return body, Lease(None)


class Snapshot:
    """One generation of a bank while it is read: its manifest body, the lease on it, and its shards,
    opened on demand and kept open (at most :data:`MAX_OPEN_SHARDS`, least recently used closed first).

    While the lease is held no shard the body names is deleted, so shards may be opened at any time.
    """

    def __init__(self, directory: str, body: dict, lease: Lease) -> None:
        self.directory, self.body, self.lease = directory, body, lease
        self._shards: "OrderedDict[str, Shard]" = OrderedDict()

    def shard(self, fname: str) -> Shard:
        """Shard ``fname`` of this generation, open (and checked against the manifest)."""
        sh = self._shards.get(fname)
        if sh is None:
            sh = self._shards[fname] = Shard(self.directory, self.body, fname)
            while len(self._shards) > MAX_OPEN_SHARDS:  # bound open file descriptors
                self._shards.popitem(last=False)[1].close()
        else:
            self._shards.move_to_end(fname)
        return sh

    def close_shards(self) -> None:
        for sh in self._shards.values():
            sh.close()
        self._shards.clear()

    def close(self) -> None:
        """Close every shard and release the lease."""
        self.close_shards()
        self.lease.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_consistently(directory: str, read: Callable[[Snapshot], T], *, keep: bool = False) -> tuple[T, Snapshot]:
    """``read(snapshot)`` of the current generation, so that what it reads is one complete version of the
    bank however often the bank is replaced meanwhile; returns its result and the snapshot.

    The snapshot is closed on return unless ``keep`` (then the caller owns it and its lease). Without
    leases (see the module doc) a shard gone missing means the bank was replaced: ``read`` runs again
    on the new manifest, up to :data:`OPEN_RETRIES` times. ``read`` must change nothing outside itself
    before it has read everything it needs.
    """
    for attempt in range(OPEN_RETRIES + 1):
        body, lease = open_generation(directory)
        snap = Snapshot(directory, body, lease)
        try:
            result = read(snap)
        except MissingShardError:
            snap.close()
            if attempt == OPEN_RETRIES or _current_body(directory) == body:
                raise  # not replaced meanwhile: the bank is damaged
            continue
        except BaseException:
            snap.close()
            raise
        if not keep:
            snap.close()
        return result, snap
    raise AssertionError("unreachable")  # pragma: no cover


def _current_body(directory: str) -> Optional[dict]:
    try:
        fd = open_manifest(directory)
    except BankFileError:
        return None
    try:
        return read_open_manifest(fd, os.path.join(directory, MANIFEST))
    except BankFileError:
        return None
    finally:
        os.close(fd)


# ---- the writer's side (the caller holds the writer lock) ------------------------------------------
def keep_current(directory: str) -> Optional[str]:
    """Give the current manifest a second name, so its generation outlives the replacement about to happen;
    the path of that name (``None`` if there is no manifest yet or the file system has no hard links)."""
    if fcntl is None:  # pragma: no cover - no leases, nothing to keep generations for
        return None
    src = os.path.join(directory, MANIFEST)
    dst = os.path.join(directory, f".{MANIFEST}.{secrets.token_hex(8)}.prev")
    try:
        if not stat.S_ISREG(os.lstat(src).st_mode):
            return None  # not a manifest this library wrote (no reader can hold it): nothing to keep
        os.link(src, dst, follow_symlinks=False)
    except FileNotFoundError:
        return None  # a new bank: no generation to keep
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        return None  # no hard links here: old generations end at the replacement; readers re-read instead
    return dst


def retire(directory: str, body: dict) -> None:
    """Retire every kept generation no reader holds, then delete the shards no remaining generation needs.

    ``body`` is the manifest now in place. Also removes temp files left by crashed writers. This is
    cleanup after a completed write: a file it cannot remove stays for the next write to retry.
    """
    keep = set(body["shards"])
    unknown = False
    for name in sorted(os.listdir(directory)):
        if PREV_RE.match(name):
            try:
                keep |= _retire_one(os.path.join(directory, name))
            except OSError:
                unknown = True  # cannot tell whether a reader holds it: delete no shard this time
    remove_orphans(directory, set(os.listdir(directory)) if unknown else keep)


def _retire_one(path: str) -> set:
    """Unlink the kept manifest ``path`` if no reader holds it; the shards it still protects."""
    try:
        fd = open_regular(path, "kept manifest")
    except FileNotFoundError:
        return set()
    except BankFileError:  # not a file this library made (no reader can hold it)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return set()
    try:
        locked = _try_lock(fd, fcntl.LOCK_EX) if fcntl is not None else True
        if locked is False:  # a reader holds this generation: keep it and every shard it names
            try:
                return set(read_open_manifest(fd, path)["shards"])
            except BankFileError:
                return set()  # unreadable: no reader could have used it either
        # no reader: unlink first (a reader that opened it but has not locked it yet sees st_nlink 0)
        os.unlink(path)
        return set()
    finally:
        os.close(fd)
