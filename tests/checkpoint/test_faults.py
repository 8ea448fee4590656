"""Fault and fuzz suite: banks under hostile files, failed writes, concurrent saves and threads; configs;
CIFAR files that try to run code.

Every test counts what it tried in :data:`CASES` under its class; the counts are printed at the end:

* ``files``   -- FIFOs, devices, symbolic links, a manifest of 200,000 tasks, headers claiming terabytes,
  tried in child processes with time and memory limits (``_hostile_probe.py``): each is refused
  with :class:`BankFileError`, nothing hangs, nothing grows memory, nothing is created outside.
* ``cache``   -- a :class:`LazyBank`'s cache against writes by its callers and by other processes.
* ``readers`` -- banks read while another process re-saves them, and the generation protocol.
* ``faults``  -- ENOSPC / EIO injected at every I/O step of every kind of write, and a real full tmpfs
  (as root): a failed write leaves the bank and its directory as they were; a write that completed
  reports success.
* ``threads`` -- one :class:`LazyBank` shared by threads.
* ``config``  -- random :class:`SupsupConfig` fields; banks of models configured differently.
* ``data``    -- CIFAR-100 files that name other globals, and random damage to a valid one.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supsup_fast import checkpoint, convert
from supsup_fast.checkpoint import LazyBank, _files, _generations, append_task, load_bank, save_bank
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import BankDurabilityWarning, BankFileError, SupsupError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _bank_writer import add_tasks, lenet  # noqa: E402
from stress_readers import stress  # noqa: E402

CASES: collections.Counter = collections.Counter()
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    lines = [f"  {k:<78} {v}" for k, v in sorted(CASES.items())]
    text = "\nfault / fuzz cases (class: case: outcome):\n" + "\n".join(lines) + "\n"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        sys.stdout.write(text)
        sys.stdout.flush()


def model(tasks: int = 3, seed: int = 5, task_seed: int = 1, **cfg) -> torch.nn.Module:
    m = convert.convert_(lenet(32), SupsupConfig(seed=seed, **cfg))
    add_tasks(m, tasks, seed=task_seed)
    return m


@functools.lru_cache(maxsize=None)
def built(tasks: int, task_seed: int = 1) -> torch.nn.Module:
    """A model the tests only read (save and append never change it), built once."""
    return model(tasks, task_seed=task_seed)


@functools.lru_cache(maxsize=None)
def built_state(tasks: int, task_seed: int = 1) -> dict:
    return state(built(tasks, task_seed))


def state(m: torch.nn.Module) -> dict:
    return {n: b.clone() for n, b in m.named_buffers() if n.endswith((".bank", "running_mean", "running_var"))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loaded(path) -> dict:
    m = built(0)  # every load replaces all of its tasks
    load_bank(m, path)
    return state(m)


def bank_files(path) -> set:
    return set(os.listdir(path))


def expected_files(path) -> set:
    """The files a bank with no reader holds: its manifest, the shards it names, the writer lock."""
    return {checkpoint.MANIFEST, checkpoint.LOCK} | set(checkpoint._manifest.read_manifest(str(path))["shards"])


def child_env() -> dict:
    """The environment of a child process that imports this very ``supsup_fast``."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([os.path.dirname(package), HERE, os.environ.get("PYTHONPATH", "")]))


# ======================================================================================
# files: hostile or odd files, in child processes (a hang or a crash must not take the suite down)
# ======================================================================================
@pytest.fixture(scope="module")
def probe_results():
    if os.name != "posix":
        pytest.skip("FIFOs, devices and fork are POSIX")
    work = tempfile.mkdtemp(prefix="supsup-probe-")
    try:
        out = subprocess.run([sys.executable, os.path.join(HERE, "_hostile_probe.py"), work], capture_output=True,
                             text=True, timeout=600, env=child_env())
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_hostile_files_are_refused_quickly_and_touch_nothing_outside(probe_results):
    assert len(probe_results) >= 30
    bad = []
    for r in probe_results:
        key = f"files: {r['case']}: {r['op']}"
        if r["outcome"] == "skipped":
            CASES[f"{key}: skipped (no permission)"] += 1
            continue
        if r["case"].startswith("shard truncated"):
            ok = r["outcome"] == "ok" and r["detail"].startswith("cache intact=True") and "BankFileError" in r["detail"]
        elif r["op"] == "save" and r["case"].startswith("manifest"):
            ok = r["outcome"] == "ok"  # a new bank replaces the broken manifest (a name, never followed)
        else:
            ok = r["outcome"] == "raised" and r["detail"].startswith("BankFileError")
        ok = ok and not r.get("outside_file")
        CASES[f"{key}: {'handled' if ok else 'FAILED ' + r['outcome']}"] += 1
        if not ok:
            bad.append(r)
    assert not bad, json.dumps(bad, indent=1)


def test_error_names_the_kind_of_file(probe_results):
    by_case = collections.defaultdict(list)
    for r in probe_results:
        by_case[r["case"]].append(r["detail"])
    for case, word in [("manifest is a FIFO", "FIFO"), ("manifest is a link to /dev/zero", "symbolic link"),
                       ("shard is a link to itself renamed", "symbolic link"), (".lock is a FIFO", "FIFO"),
                       (".lock is a link outside the bank", "symbolic link"),
                       ("manifest lists 200,000 tasks", "missing"),
                       ("shard header claims 4 TiB", "corrupted shard header")]:
        assert all(word in d for d in by_case[case] if d.startswith("BankFileError")), (case, by_case[case])


@pytest.mark.parametrize("seed_format", [1, 2])  # format 2: the lazy base is not regenerated either
def test_eager_load_checks_every_tensor_before_allocating(tmp_path, monkeypatch, seed_format):
    save_bank(model(3, seed_format=seed_format), tmp_path / "b")
    doc = json.loads((tmp_path / "b" / checkpoint.MANIFEST).read_text())
    doc["body"]["tasks"] = [dict(doc["body"]["tasks"][0]) for _ in range(50_000)]
    doc["body_sha256"] = _files.sha256_hex(_files.canonical_json(doc["body"]).encode())
    (tmp_path / "b" / checkpoint.MANIFEST).write_text(json.dumps(doc))
    big = []
    real_empty = torch.empty

    def counting_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        big.append(t.numel() * t.element_size())
        return t

    dst = model(0, seed_format=seed_format)
    monkeypatch.setattr(torch, "empty", counting_empty)
    with pytest.raises(BankFileError, match="'3/1/mask' is missing"):
        load_bank(dst, tmp_path / "b")
    monkeypatch.undo()
    shard_bytes = sum(os.path.getsize(tmp_path / "b" / f) for f in os.listdir(tmp_path / "b")
                      if f.endswith(".safetensors"))
    assert sum(big) <= shard_bytes, f"allocated {sum(big)} bytes for a bank of {shard_bytes}"
    CASES["files: 50,000-task manifest, in process: refused before allocating"] += 1


# ======================================================================================
# cache: the LazyBank owns what it verified
# ======================================================================================
def test_lazy_bank_hands_out_copies(tmp_path):
    src = model(3)
    save_bank(src, tmp_path / "b")
    bank = LazyBank(tmp_path / "b")
    want = {n: bank.masks(1)[n].clone() for n in bank.masks(1)}
    for getter in (lambda: bank.masks(1), lambda: {m: f["mask"] for m, f in bank.task(1).items() if "mask" in f}):
        got = getter()
        for v in got.values():
            v.zero_()
        CASES["cache: caller writes into what masks()/task() returned"] += 1
    for n, v in bank.masks(1).items():
        assert torch.equal(v, want[n])
    dst = model(0)
    bank.activate(dst, 1)
    assert torch.equal(dst.get_submodule("1").bank[0], src.get_submodule("1").bank[1])
    bank.close()


@pytest.mark.parametrize("damage", ["zeros", "random bytes", "rewritten shorter then regrown"])
def test_shard_changed_in_place_after_verification(tmp_path, damage):
    src = model(3)
    save_bank(src, tmp_path / "b")
    bank = LazyBank(tmp_path / "b")
    before = bank.masks(0)
    shard = next(tmp_path / "b" / f for f in os.listdir(tmp_path / "b") if f.startswith("tasks-"))
    size = os.path.getsize(shard)
    header = int.from_bytes(shard.read_bytes()[:8], "little") + 8
    with open(shard, "r+b") as f:  # the same inode, changed under the open bank
        if damage == "rewritten shorter then regrown":
            f.truncate(header)
            f.truncate(size)
        else:
            f.seek(header)
            body = bytes(size - header) if damage == "zeros" else os.urandom(size - header)
            f.write(body)
    dst = model(0)
    bank.activate(dst, 0)  # from the cache: the bytes verified before the change
    for name, words in before.items():
        assert torch.equal(dst.get_submodule(name).bank[0], words)
        assert torch.equal(dst.get_submodule(name).bank[0], src.get_submodule(name).bank[0])
    with pytest.raises(BankFileError, match="checksum mismatch"):
        bank.masks(2)  # not cached: read now, and refused
    CASES[f"cache: shard changed in place ({damage}): cache intact, uncached task refused"] += 1
    bank.close()


# ======================================================================================
# readers during saves
# ======================================================================================
def test_readers_never_see_a_partial_bank_while_another_process_saves():
    counts = stress(5.0)
    for k, v in counts.items():
        CASES[f"readers: two processes, 5 s: {k}"] += v
    failed = {k: v for k, v in counts.items() if "BankFileError" in k}
    opens = sum(v for k, v in counts.items() if not k.startswith("writer"))
    assert not failed, failed
    assert opens >= 10 and counts["writer: saves completed"] >= 3, counts  # the two really overlapped


def test_open_lazy_bank_keeps_its_version_through_resaves(tmp_path):
    path = tmp_path / "b"
    first = model(4, task_seed=1)
    save_bank(first, path, metadata={"v": 1})
    bank = load_bank(model(0), path, lazy=True)
    save_bank(model(4, task_seed=2), path, metadata={"v": 2})
    save_bank(model(4, task_seed=3), path, metadata={"v": 3})
    assert bank.info.metadata == {"v": 1}
    for t in range(4):  # shards of version 1, never read before the re-saves, still there for this reader
        for name, words in bank.masks(t).items():
            assert torch.equal(words, first.get_submodule(name).bank[t])
    CASES["readers: lazy bank open across 2 re-saves: reads its own version"] += 1
    assert bank.refresh() == 4 and bank.info.metadata == {"v": 3}  # moves to the current version
    bank.close()
    save_bank(model(2, task_seed=4), path, metadata={"v": 4})
    assert bank_files(path) == expected_files(path)  # no reader left: nothing of old versions remains
    assert not any(_files.PREV_RE.match(f) for f in os.listdir(path))


def test_reader_without_leases_rereads_a_manifest_replaced_under_it(tmp_path, monkeypatch):
    """Where flock or hard links are missing: a shard gone because the bank was replaced -> read the new one."""
    path = tmp_path / "b"
    save_bank(model(3, task_seed=1), path, metadata={"v": 1})
    newer = model(3, task_seed=2)
    monkeypatch.setattr(_generations, "_try_lock", lambda fd, kind: None)  # a file system without locks
    monkeypatch.setattr(_generations, "keep_current", lambda directory: None)  # ... and without hard links
    real_shard = _generations.Shard
    fired = []

    def shard_then_resave(directory, body, fname):
        if not fired:  # the first shard a reader opens: the bank is replaced just before
            fired.append(1)
            save_bank(newer, path, metadata={"v": 2})
        return real_shard(directory, body, fname)

    monkeypatch.setattr(_generations, "Shard", shard_then_resave)
    dst = model(0)
    info = load_bank(dst, path)
    assert fired and info.metadata == {"v": 2} and same(state(dst), state(newer))
    CASES["readers: no leases, bank replaced mid-open: re-read, complete new version"] += 1


def test_damaged_bank_is_not_retried_forever(tmp_path):
    path = tmp_path / "b"
    save_bank(model(3), path)
    os.unlink(next(path / f for f in os.listdir(path) if f.startswith("tasks-")))
    with pytest.raises(BankFileError, match="missing"):
        load_bank(model(0), path)
    CASES["readers: shard deleted, manifest unchanged: refused, not retried"] += 1


# ======================================================================================
# faults: every I/O step of every write fails in turn
# ======================================================================================
class Faults:
    """Counts I/O steps of a write and makes step ``fail_at`` raise ``OSError(err)``."""

    POINTS = ("write_all", "fsync", "replace", "link")

    def __init__(self, monkeypatch, fail_at: int = -1, err: int = errno.ENOSPC):
        self.calls: list = []
        self.fail_at, self.err = fail_at, err
        real = {"write_all": _files.write_all, "fsync": os.fsync, "replace": os.replace, "link": os.link}

        def wrap(point):
            def faulty(*args, **kwargs):
                self.calls.append(point)
                if len(self.calls) - 1 == self.fail_at:
                    raise OSError(self.err, os.strerror(self.err))
                return real[point](*args, **kwargs)
            return faulty

        monkeypatch.setattr(_files, "write_all", wrap("write_all"))
        for point in ("fsync", "replace", "link"):
            monkeypatch.setattr(os, point, wrap(point))


WRITES = {
    # name: (prepare(path) -> old state or None, write(path) -> new state)
    "save over a bank": (lambda p: (save_bank(built(3), p), built_state(3))[1],
                         lambda p: (save_bank(built(2, 2), p), built_state(2, 2))[1]),
    "save a new bank": (lambda p: None, lambda p: (save_bank(built(2, 2), p), built_state(2, 2))[1]),
    "append a task": (lambda p: (save_bank(built(3), p), built_state(3))[1],
                      lambda p: (append_task(built(4), p, 3), built_state(4))[1]),
    "append task 0 to no bank": (lambda p: None, lambda p: (append_task(built(1), p, 0), built_state(1))[1]),
}
#: the error each kind of step fails with (both take the same path through the code)
STEP_ERRORS = {"write_all": errno.ENOSPC, "fsync": errno.EIO, "replace": errno.EIO, "link": errno.ENOSPC}


def _steps(write, monkeypatch, tmp_path) -> list:
    prepare, run = WRITES[write]
    path = tmp_path / "count"
    prepare(path)
    with monkeypatch.context() as mp:
        faults = Faults(mp)
        run(path)
    return faults.calls


@pytest.mark.parametrize("write", sorted(WRITES))
def test_every_failed_io_step_leaves_the_bank_as_it_was(write, tmp_path, monkeypatch):
    prepare, run = WRITES[write]
    steps = _steps(write, monkeypatch, tmp_path)
    assert {"write_all", "fsync", "replace"} <= set(steps)
    last_replace = max(i for i, s in enumerate(steps) if s == "replace")  # the manifest's rename
    for k in range(len(steps)):
        for err in (STEP_ERRORS[steps[k]],):
            path = tmp_path / f"case-{k}-{err}"
            old = prepare(path)
            before = bank_files(path) if old is not None else set()
            with monkeypatch.context() as mp, warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                Faults(mp, fail_at=k, err=err)
                try:
                    new = run(path)
                    raised = None
                except OSError as e:
                    raised = e
            what = f"faults: {write}: {steps[k]} #{k} fails with {errno.errorcode[err]}"
            if k <= last_replace:  # failed before the manifest was in place: nothing changed, it says so
                assert raised is not None and raised.errno == err, what
                assert "unchanged" in " ".join(getattr(raised, "__notes__", [])) or not before, what
                if old is None:
                    assert not os.path.exists(path / checkpoint.MANIFEST), what
                    assert not [f for f in os.listdir(path) if f != checkpoint.LOCK], (what, os.listdir(path))
                else:
                    assert same(loaded(path), old), what
                    assert bank_files(path) == before, (what, bank_files(path) ^ before)
                CASES[f"{what}: raised, bank unchanged, no file left"] += 1
            else:  # after the rename: the change is made, and reported as made
                assert raised is None, (what, raised)
                assert same(loaded(path), new), what
                assert bank_files(path) == expected_files(path), what
                durability = [w for w in warned if issubclass(w.category, BankDurabilityWarning)]
                assert durability and "in place" in str(durability[0].message), what
                CASES[f"{what}: succeeded with a durability warning"] += 1
            shutil.rmtree(path)


def test_failed_write_is_not_retried_into_a_mess(tmp_path, monkeypatch):
    """After a failed append the same append simply succeeds (no stale shard, no task index taken)."""
    path = tmp_path / "b"
    save_bank(built(3), path)
    m = built(4)
    with monkeypatch.context() as mp:
        Faults(mp, fail_at=3, err=errno.ENOSPC)  # the manifest's write
        with pytest.raises(OSError):
            append_task(m, path, 3)
    assert append_task(m, path, 3).num_tasks == 4
    assert same(loaded(path), state(m)) and bank_files(path) == expected_files(path)
    CASES["faults: failed append, then the same append: succeeds, nothing stale"] += 1


@pytest.fixture
def small_tmpfs(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode()[-200:]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(small_tmpfs):
    """Appends until the file system is full, then re-saves: every failure leaves the last complete bank."""
    path = small_tmpfs / "bank"
    m = model(1)
    append_task(m, path, 0)
    last = state(m)
    failures = 0
    for t in range(1, 200):
        add_tasks(m, 1, seed=t)
        before = bank_files(path)
        try:
            append_task(m, path, t)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert bank_files(path) == before and bank_files(path) == expected_files(path)
            assert checkpoint.read_bank_info(path).num_tasks == t and same(loaded(path), last)
            failures += 1
            CASES["faults: real full tmpfs: append fails with ENOSPC, bank intact"] += 1
            break
        last = state(m)
        CASES["faults: real full tmpfs: append fits"] += 1
    assert failures == 1, "the tmpfs never filled up"
    with pytest.raises(OSError) as e:
        save_bank(model(40), path)  # a whole new bank cannot fit either
    assert e.value.errno == errno.ENOSPC and bank_files(path) == expected_files(path)
    checkpoint.verify_bank(path)
    CASES["faults: real full tmpfs: re-save fails with ENOSPC, old bank intact"] += 1


# ======================================================================================
# threads
# ======================================================================================
def test_lazy_bank_shared_by_threads(tmp_path):
    src = model(8)
    save_bank(src, tmp_path / "b")
    per_task = sum(m.bank[0].numel() * 4 for m in convert.masked_layers(src) if hasattr(m, "bank")) + 2 * 100 * 4
    bank = LazyBank(tmp_path / "b", cache_bytes=3 * per_task)
    errors, calls = [], 300

    def work(k):
        try:
            for i in range(calls):
                t = (i * (k + 1) + k) % 8
                got = bank.masks(t)
                if not torch.equal(got["1"], src.get_submodule("1").bank[t]):
                    errors.append(f"thread {k}: task {t} wrong")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[:5]
    assert bank.hits + bank.misses == 4 * calls
    assert bank.cached_bytes == sum(e[1] for e in bank._cache.values()) <= bank.cache_bytes
    assert bank.cached_bytes == per_task * len(bank.cached_tasks)
    CASES["threads: 4 threads x 300 reads of a LazyBank with a 3-task budget"] += 4 * calls
    bank.close()


# ======================================================================================
# config
# ======================================================================================
FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                         st.sampled_from(["topk", "threshold", "uniform", "erdos_renyi", "signed_constant",
                                          "pretrained", "kaiming_uniform", "transfer", "", "x"]),
                         st.just(np.float32(0.25)), st.just(np.int64(3)), st.just(np.bool_(True)), st.just([1]))


@given(field=st.sampled_from([f for f in SupsupConfig.__dataclass_fields__]), value=FIELD_VALUES)
@settings(FUZZ, max_examples=400)
def test_config_fields_are_checked(field, value):
    try:
        cfg = SupsupConfig(**{field: value})
    except SupsupError as e:
        assert field in str(e) or "Erdős" in str(e), (field, value, str(e))
        CASES["config: random field value: refused naming the field"] += 1
        return
    for name, want in (("density", float), ("gain", float), ("seed", int)):
        assert type(getattr(cfg, name)) is want, (name, getattr(cfg, name))
    assert 0 < cfg.density <= 1 and math.isfinite(cfg.gain) and cfg.gain > 0 and 0 <= cfg.seed < 2**32
    assert cfg.erdos_renyi_scale is None or (type(cfg.erdos_renyi_scale) is float
                                             and math.isfinite(cfg.erdos_renyi_scale) and cfg.erdos_renyi_scale > 0)
    assert cfg.max_tasks is None or (type(cfg.max_tasks) is int and cfg.max_tasks >= 1)
    assert type(cfg.keep_bias) is bool and type(cfg.per_task_norm) is bool
    CASES["config: random field value: accepted, every invariant holds"] += 1


# ======================================================================================
# data: CIFAR-100 files that try to run code
# ======================================================================================
class _Marker:
    """Unpickling calls ``os.system`` to create the marker file (the classic crafted pickle)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Eval:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({self.path!r}, 'w').close()",))


class _SubArray(np.ndarray):
    pass


def _cifar_dir(tmp_path, train_obj, protocol=2):
    base = tmp_path / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    good = {"data": np.zeros((100, 3072), np.uint8), "fine_labels": list(range(100))}
    (base / "train").write_bytes(pickle.dumps(train_obj, protocol=protocol))
    (base / "test").write_bytes(pickle.dumps(good, protocol=protocol))
    return tmp_path


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("payload", ["os.system", "eval", "ndarray subclass", "object array", "nested in a list"])
def test_cifar_file_that_names_other_globals_runs_nothing(tmp_path, payload, protocol):
    from supsup_fast.experiments import data

    marker = tmp_path / "ran"
    obj = {"os.system": lambda: {"data": _Marker(marker), "fine_labels": [0]},
           "eval": lambda: _Eval(marker),
           "ndarray subclass": lambda: {"data": np.zeros((1, 3072), np.uint8).view(_SubArray), "fine_labels": [0]},
           "object array": lambda: {"data": np.array([_Marker(marker)], dtype=object), "fine_labels": [0]},
           "nested in a list": lambda: {"data": np.zeros((1, 3072), np.uint8), "fine_labels": [0],
                                        "filenames": [_Marker(marker)]}}[payload]()
    root = _cifar_dir(tmp_path / "d", obj, protocol)
    with pytest.raises(data.DatasetUnavailable, match="not a CIFAR-100 python file"):
        data.cifar100(root)
    assert not marker.exists()
    CASES[f"data: crafted CIFAR file ({payload}, protocol {protocol}): refused, nothing run"] += 1


def test_cifar_python2_layout_loads(tmp_path):
    """The real files were written by Python 2: arrays' bytes are ``str``, decoded as latin-1."""
    from supsup_fast.experiments import data

    images = np.random.default_rng(0).integers(0, 256, (100, 3072), dtype=np.uint8)

    class Py2Array:  # pickles like Python 2's numpy: _reconstruct + state whose data is a latin-1 str
        def __reduce__(self):
            fn, args, st8 = images.__reduce__()
            return fn, args, (*st8[:4], st8[4].decode("latin1"))

    root = _cifar_dir(tmp_path, {"data": Py2Array(), "fine_labels": list(range(100)), "batch_label": "training",
                                 "coarse_labels": [0] * 100, "filenames": ["x.png"] * 100})
    src = data.cifar100(root)
    assert torch.equal((src.x_train * 255).round().to(torch.uint8).reshape(100, -1), torch.from_numpy(images))
    CASES["data: Python 2 layout: loads"] += 1


@given(pos=st.integers(0, 10**6), value=st.integers(0, 255), cut=st.booleans())
@settings(FUZZ, max_examples=150)
def test_cifar_damaged_file_is_refused_or_read_exactly(tmp_path_factory, pos, value, cut):
    from supsup_fast.experiments import data

    tmp = tmp_path_factory.mktemp("cifar")
    marker = tmp / "ran"
    good = {"data": np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072), "fine_labels": [3, 99],
            "filenames": ["a", "b"]}
    raw = bytearray(pickle.dumps(good, protocol=2))
    pos %= len(raw)
    if cut:
        raw = raw[:pos]
    else:
        raw[pos] = value
    path = tmp / "batch"
    path.write_bytes(bytes(raw))
    cwd = os.getcwd()
    os.chdir(tmp)  # anything a damaged pickle could write lands here
    try:
        xs, ys = data._read_cifar_batch(path)
    except data.DatasetUnavailable:
        CASES["data: damaged CIFAR file: refused"] += 1
    else:
        assert xs.dtype == np.uint8 and xs.shape[1:] == (3, 32, 32) and ys.dtype == np.int64
        assert ((ys >= 0) & (ys < 100)).all() and len(ys) == len(xs)
        CASES["data: damaged CIFAR file: read, well-formed"] += 1
    finally:
        os.chdir(cwd)
    assert not marker.exists() and sorted(os.listdir(tmp)) == ["batch"]
