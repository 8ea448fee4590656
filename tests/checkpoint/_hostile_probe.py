"""Bank operations on hostile files, each in a child process with a time and memory limit.

``python _hostile_probe.py WORKDIR`` saves a small bank, then for every case of :data:`CASES`
copies it, damages the copy and runs one bank operation on it in a forked child limited to
:data:`TIMEOUT_S` seconds and :data:`EXTRA_MEMORY` bytes of address space beyond the parent's. It
prints one JSON object per line: ``{"case", "op", "outcome", "detail", "seconds"}``, where
``outcome`` is ``"ok"`` (returned), ``"raised"`` (with the exception type and message), ``"hang"``
(killed at the time limit) or ``"signal"`` (the child died of a signal, e.g. SIGBUS). Run by ``test_faults.py``:
what would hang or kill a test process is tried here, where it cannot.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import struct
import sys
import time

import torch

torch.set_num_threads(1)  # before any op: no worker threads, so forked children are safe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bank_writer import add_tasks, lenet  # noqa: E402

from supsup_fast import checkpoint, convert  # noqa: E402
from supsup_fast.checkpoint._files import canonical_json, sha256_hex  # noqa: E402
from supsup_fast.config import SupsupConfig  # noqa: E402

TIMEOUT_S = 20.0
EXTRA_MEMORY = 3 << 30


def _model(tasks: int = 0, width: int = 32):
    m = convert.convert_(lenet(width), SupsupConfig(seed=5))
    add_tasks(m, tasks, seed=3)
    return m


def _shard(bank: str) -> str:
    return os.path.join(bank, sorted(f for f in os.listdir(bank) if f.startswith("tasks-"))[0])


# ---- damage ----------------------------------------------------------------------------------------
def fifo_manifest(bank):
    os.unlink(os.path.join(bank, "manifest.json"))
    os.mkfifo(os.path.join(bank, "manifest.json"))


def devzero_manifest(bank):
    os.unlink(os.path.join(bank, "manifest.json"))
    os.symlink("/dev/zero", os.path.join(bank, "manifest.json"))


def device_manifest(bank):  # the device itself, not a link to it (needs the right to mknod)
    os.unlink(os.path.join(bank, "manifest.json"))
    os.mknod(os.path.join(bank, "manifest.json"), stat.S_IFCHR | 0o600, os.makedev(1, 5))


def symlinked_manifest(bank):  # a link to a copy of the real manifest: still not a regular file of the bank
    real = os.path.join(bank, "manifest.json")
    shutil.copy(real, real + ".copy")
    os.unlink(real)
    os.symlink(real + ".copy", real)


def fifo_shard(bank):
    path = _shard(bank)
    os.unlink(path)
    os.mkfifo(path)


def symlinked_shard(bank):
    path = _shard(bank)
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)


def fifo_lock(bank):
    os.unlink(os.path.join(bank, ".lock"))
    os.mkfifo(os.path.join(bank, ".lock"))


def symlinked_lock(bank):
    os.unlink(os.path.join(bank, ".lock"))
    os.symlink(os.path.join(os.path.dirname(bank), "outside-the-bank"), os.path.join(bank, ".lock"))


def many_tasks(bank):  # a manifest listing 200,000 tasks of a shard holding 3
    mpath = os.path.join(bank, "manifest.json")
    doc = json.load(open(mpath))
    first = doc["body"]["tasks"][0]
    doc["body"]["tasks"] = [dict(first) for _ in range(200_000)]
    doc["body_sha256"] = sha256_hex(canonical_json(doc["body"]).encode())
    with open(mpath, "w") as f:
        json.dump(doc, f)


def huge_header_claims(bank):  # a shard whose (re-digested) header claims a tensor far beyond the file
    path = _shard(bank)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    key = next(k for k in hdr if k != "__metadata__")
    hdr[key]["shape"] = [1 << 20, 1 << 20]
    hdr[key]["data_offsets"] = [0, (1 << 42)]
    new = json.dumps(hdr).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    data = struct.pack("<Q", len(new)) + new + raw[8 + n:]
    open(path, "wb").write(data)
    mpath = os.path.join(bank, "manifest.json")
    doc = json.load(open(mpath))
    entry = doc["body"]["shards"][os.path.basename(path)]
    entry["nbytes"] = len(data)
    entry["header_sha256"] = sha256_hex(data[: 8 + len(new)])
    doc["body_sha256"] = sha256_hex(canonical_json(doc["body"]).encode())
    with open(mpath, "w") as f:
        json.dump(doc, f)


# ---- operations --------------------------------------------------------------------------------------
def op_info(bank, width):
    return checkpoint.read_bank_info(bank).num_tasks


def op_load(bank, width):
    return checkpoint.load_bank(_model(width=width), bank).num_tasks


def op_lazy(bank, width):
    lazy = checkpoint.load_bank(_model(width=width), bank, lazy=True)
    return sum(len(lazy.masks(t)) for t in range(min(lazy.num_tasks, 3)))


def op_verify(bank, width):
    return checkpoint.verify_bank(bank).num_tasks


def op_append(bank, width):
    m = _model(4)
    return checkpoint.append_task(m, bank, 3).num_tasks


def op_save(bank, width):
    return checkpoint.save_bank(_model(2), bank).num_tasks


def op_lazy_truncated(bank, width):
    """Read task 0, truncate its shard in place (same inode), read again from the cache and the file."""
    lazy = checkpoint.LazyBank(bank)
    before = lazy.masks(0)
    os.truncate(_shard(bank), 100)
    after = lazy.masks(0)  # cached: the verified bytes
    same = all(torch.equal(before[k], after[k]) for k in before)
    try:
        lazy.masks(1)  # not cached: read from the truncated file
        fresh = "read"
    except checkpoint.BankFileError as e:
        fresh = f"BankFileError: {e}"
    return f"cache intact={same}; uncached task: {fresh}"


READERS = ("info", "load", "lazy", "verify")
WRITERS = ("append", "save")
CASES = {  # case: (damage, operations, model width)
    "manifest is a FIFO": (fifo_manifest, READERS + WRITERS, 32),
    "manifest is a link to /dev/zero": (devzero_manifest, READERS + WRITERS, 32),
    "manifest is a character device": (device_manifest, READERS, 32),
    "manifest is a link to a copy": (symlinked_manifest, READERS, 32),
    "shard is a FIFO": (fifo_shard, ("load", "lazy", "verify"), 32),
    "shard is a link to itself renamed": (symlinked_shard, ("load", "lazy", "verify"), 32),
    ".lock is a FIFO": (fifo_lock, WRITERS, 32),
    ".lock is a link outside the bank": (symlinked_lock, WRITERS, 32),
    "manifest lists 200,000 tasks": (many_tasks, ("load",), 300),
    "shard header claims 4 TiB": (huge_header_claims, ("load", "lazy", "verify"), 32),
    "shard truncated in place after a lazy read": (None, ("lazy_truncated",), 32),
}
OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def _child(result_fd: int, bank: str, op: str, width: int) -> None:
    try:  # Linux: address space limited to what the parent has mapped plus EXTRA_MEMORY
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_MEMORY, hard))
    except (OSError, ValueError, IndexError):
        pass
    try:
        res = {"outcome": "ok", "detail": str(OPS[op](bank, width))}
    except BaseException as e:  # noqa: BLE001 - every outcome is reported
        res = {"outcome": "raised", "detail": f"{type(e).__name__}: {e}"[:400]}
    os.write(result_fd, json.dumps(res).encode())
    os._exit(0)


def run_case(workdir: str, pristine: str, case: str, op: str) -> dict:
    damage, _, width = CASES[case]
    root = os.path.join(workdir, f"{len(os.listdir(workdir))}")
    os.makedirs(root)
    bank = os.path.join(root, "bank")
    shutil.copytree(pristine[width], bank)
    try:
        if damage is not None:
            damage(bank)
    except PermissionError as e:
        return {"case": case, "op": op, "outcome": "skipped", "detail": f"cannot set up: {e}"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(w, bank, op, width)
    os.close(w)
    start = time.monotonic()
    deadline = start + TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        return {"case": case, "op": op, "outcome": "hang", "detail": f"killed after {TIMEOUT_S} s"}
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    if os.WIFSIGNALED(status):
        return {"case": case, "op": op, "outcome": "signal", "detail": signal.Signals(os.WTERMSIG(status)).name}
    res = json.loads(data) if data else {"outcome": "exited", "detail": f"status {status}"}
    res.update(case=case, op=op, seconds=round(time.monotonic() - start, 3),
               outside_file=os.path.lexists(os.path.join(root, "outside-the-bank")))
    return res


def main(workdir: str) -> None:
    pristine = {}
    for width in (32, 300):
        pristine[width] = os.path.join(workdir, f"pristine-{width}")
        checkpoint.save_bank(_model(3, width), pristine[width])
    cases_dir = os.path.join(workdir, "cases")
    os.makedirs(cases_dir)
    for case, (_, ops, _) in CASES.items():
        for op in ops:
            print(json.dumps(run_case(cases_dir, pristine, case, op)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
