"""Mask-bank files: round trips, appends, lazy loading, refusal of bad files, and crash safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from supsup_fast import checkpoint, convert
from supsup_fast.checkpoint import LazyBank, append_task, load_bank, read_bank_info, save_bank, verify_bank
from supsup_fast.checkpoint._files import canonical_json, sha256_hex
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import BankFileError, SupsupError

sys.path.insert(0, os.path.dirname(__file__))
from _bank_writer import add_tasks, lenet, versioned_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def small(seed: int = 5, tasks: int = 4, base: str = "signed_constant", width: int = 32) -> nn.Module:
    model = convert.convert_(lenet(width), SupsupConfig(seed=seed, base=base))
    add_tasks(model, tasks, seed=seed * 31 + tasks)
    return model


def task_state(model: nn.Module) -> dict:
    """Everything a bank stores, as comparable tensors."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "bank"):
            out[name + ".bank"] = m.bank.clone()
            if getattr(m, "base_id", None) is None:
                out[name + ".weight"] = m.weight.clone()
        if hasattr(m, "running_mean"):
            out[name + ".running_mean"] = m.running_mean.clone()
            out[name + ".running_var"] = m.running_var.clone()
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def outputs(model: nn.Module, x: torch.Tensor, tasks) -> list:
    model.eval()
    res = []
    with torch.no_grad():
        for t in tasks:
            convert.set_task(model, t)
            res.append(model(x))
    return res


# ======================================================================================
# Round trips
# ======================================================================================
@pytest.mark.parametrize("base", ["signed_constant", "pretrained"])
def test_round_trip_restores_every_task(tmp_path, base):
    src = small(base=base)
    path = tmp_path / "bank"
    info = save_bank(src, path, task_names=["a", "b", "c", "d"], metadata={"run": "x", "lr": 0.1},
                     task_metadata=[{"acc": i / 4} for i in range(4)])
    assert info.num_tasks == 4 and info.nbytes > 0
    dst = convert.convert_(lenet(32), SupsupConfig(seed=5, base=base))  # pretrained: fresh random weights
    loaded = load_bank(dst, path)
    assert loaded.task_names == ["a", "b", "c", "d"]
    assert loaded.task_metadata[3] == {"acc": 0.75} and loaded.metadata == {"run": "x", "lr": 0.1}
    assert loaded.loaded_tasks == [0, 1, 2, 3]
    assert_same_state(task_state(src), task_state(dst))
    x = torch.randn(5, 784)
    for ya, yb in zip(outputs(src, x, range(4)), outputs(dst, x, range(4))):
        assert torch.equal(ya, yb)
    assert read_bank_info(path).task_names == ["a", "b", "c", "d"]
    assert verify_bank(path).num_tasks == 4


def test_conv_model_with_kept_bias_round_trips(tmp_path):
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 5, 3, stride=2, groups=1), nn.Flatten())

    cfg = SupsupConfig(seed=2, base="pretrained", keep_bias=True)
    torch.manual_seed(0)
    src = convert.convert_(net(), cfg)
    torch.manual_seed(1)
    for _ in range(3):
        convert.begin_task(src)
        src.train()
        src(torch.randn(4, 3, 9, 9))
        convert.freeze_task(src)
    save_bank(src, tmp_path / "b")
    torch.manual_seed(2)
    dst = convert.convert_(net(), cfg)  # other random weights and biases: the bank restores them
    load_bank(dst, tmp_path / "b")
    x = torch.randn(2, 3, 9, 9)
    for ya, yb in zip(outputs(src, x, range(3)), outputs(dst, x, range(3))):
        assert torch.equal(ya, yb)


def test_load_selected_tasks_in_given_order(tmp_path):
    src = small()
    save_bank(src, tmp_path / "b", task_names=["a", "b", "c", "d"])
    dst = convert.convert_(lenet(32), SupsupConfig(seed=5))
    info = load_bank(dst, tmp_path / "b", tasks=["c", 0])
    assert info.loaded_tasks == [2, 0] and convert.num_tasks(dst) == 2
    x = torch.randn(3, 784)
    want = outputs(src, x, [2, 0])
    got = outputs(dst, x, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_empty_model_bank_then_appends(tmp_path):
    model = small(tasks=0)
    save_bank(model, tmp_path / "b")
    assert read_bank_info(tmp_path / "b").num_tasks == 0
    add_tasks(model, 2, seed=3)
    append_task(model, tmp_path / "b", 0)
    append_task(model, tmp_path / "b", 1, name="second", metadata={"steps": 10})
    dst = convert.convert_(lenet(32), SupsupConfig(seed=5))
    info = load_bank(dst, tmp_path / "b")
    assert info.task_names == [None, "second"] and info.task_metadata == [{}, {"steps": 10}]
    assert_same_state(task_state(model), task_state(dst))


def test_append_creates_a_bank_from_task_zero(tmp_path):
    model = small(tasks=1)
    append_task(model, tmp_path / "new", 0, name="first")
    assert read_bank_info(tmp_path / "new").task_names == ["first"]


# ======================================================================================
# Appending never rewrites what is stored
# ======================================================================================
def _files(path) -> dict:
    out = {}
    for f in os.listdir(path):
        p = os.path.join(path, f)
        st = os.stat(p)
        with open(p, "rb") as fh:
            out[f] = (st.st_ino, st.st_mtime_ns, fh.read())
    return out


def test_append_leaves_existing_shards_untouched(tmp_path):
    model = small(tasks=3)
    path = tmp_path / "b"
    save_bank(model, path)
    before = _files(path)
    add_tasks(model, 1, seed=11)
    info = append_task(model, path, 3, name="new")
    after = _files(path)
    for f, v in before.items():
        if f != checkpoint.MANIFEST:
            assert after[f] == v, f  # same inode, same mtime, same bytes
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("tasks-000003-")
    assert info.num_tasks == 4
    dst = convert.convert_(lenet(32), SupsupConfig(seed=5))
    load_bank(dst, path)
    assert_same_state(task_state(model), task_state(dst))


def test_append_refuses_out_of_order_and_foreign_models(tmp_path):
    model = small(tasks=3)
    path = tmp_path / "b"
    save_bank(model, path, task_names=["a", "b", "c"])
    add_tasks(model, 2, seed=12)
    with pytest.raises(SupsupError, match="next task to append is model task 3, not 4"):
        append_task(model, path, 4)
    with pytest.raises(SupsupError, match="not a frozen task"):
        append_task(model, path, 5)
    with pytest.raises(SupsupError, match="unique"):
        append_task(model, path, 3, name="a")
    other = small(seed=6, tasks=4)
    with pytest.raises(BankFileError, match="different model"):
        append_task(other, path, 3)
    with pytest.raises(BankFileError, match="no mask bank here"):
        append_task(model, tmp_path / "missing", 2)
    assert read_bank_info(path).num_tasks == 3  # nothing was written by the refusals


# ======================================================================================
# Lazy loading
# ======================================================================================
def test_lazy_bank_activates_tasks_and_keeps_a_byte_budget(tmp_path):
    src = small(tasks=6)
    save_bank(src, tmp_path / "b", task_names=[f"t{i}" for i in range(6)])
    dst = convert.convert_(lenet(32), SupsupConfig(seed=5))
    per_task = sum(m.bank[0].numel() * 4 for m in convert.masked_layers(src) if hasattr(m, "bank")) + 2 * 100 * 4
    bank = load_bank(dst, tmp_path / "b", lazy=True, cache_bytes=int(2.5 * per_task))
    assert isinstance(bank, LazyBank) and convert.num_tasks(dst) == 0 and len(bank) == 6
    x = torch.randn(4, 784)
    want = outputs(src, x, range(6))
    dst.eval()
    for t in [0, 1, 2, 1, "t4"]:
        bank.activate(dst, t)
        ti = 4 if t == "t4" else t
        with torch.no_grad():
            assert torch.equal(dst(x), want[ti])
    assert bank.cached_tasks == [1, 4] and bank.cached_bytes == 2 * per_task <= bank.cache_bytes
    assert bank.hits == 1 and bank.misses == 4
    # a subset for superposition: the same model an eager load of that subset gives
    bank.activate(dst, [5, 2, 3])
    eager = convert.convert_(lenet(32), SupsupConfig(seed=5))
    load_bank(eager, tmp_path / "b", tasks=[5, 2, 3])
    assert_same_state(task_state(eager), task_state(dst))
    # the model may write into its bank: the cache stays as read
    dst.get_submodule("1").bank.zero_()
    assert bank.masks(2)["1"].abs().sum() > 0
    with pytest.raises(SupsupError, match="out of range"):
        bank.activate(dst, 6)
    with pytest.raises(SupsupError, match="no task named"):
        bank.activate(dst, "zz")
    with pytest.raises(BankFileError, match="different model"):
        bank.activate(small(seed=9, tasks=0), 0)
    bank.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_and_cuda_cache(tmp_path):
    src = small(tasks=3)
    save_bank(src, tmp_path / "b")
    dst = _fresh().cuda()
    load_bank(dst, tmp_path / "b")
    assert all(b.device.type == "cuda" for b in dst.buffers())
    assert_same_state(task_state(src), {k: v.cpu() for k, v in task_state(dst).items()})
    with pytest.raises(SupsupError, match="model is on"):
        load_bank(dst, tmp_path / "b", device="cpu")
    lazy_model = _fresh().cuda()
    bank = load_bank(lazy_model, tmp_path / "b", lazy=True)
    assert bank.device.type == "cuda" and bank.masks(1)["1"].device.type == "cuda"
    bank.activate(lazy_model, 1)
    x = torch.randn(4, 784)
    want = outputs(src, x, [1])[0]
    lazy_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(lazy_model(x.cuda()).cpu(), want, rtol=1e-4, atol=1e-5)


def test_lazy_bank_sees_appended_tasks_after_refresh(tmp_path):
    model = small(tasks=2)
    save_bank(model, tmp_path / "b")
    bank = LazyBank(tmp_path / "b")
    add_tasks(model, 1, seed=4)
    append_task(model, tmp_path / "b", 2)
    assert bank.num_tasks == 2 and bank.refresh() == 3
    assert torch.equal(bank.masks(2)["1"], model.get_submodule("1").bank[2])


def test_lazy_bank_verifies_each_task_on_first_read(tmp_path):
    save_bank(small(tasks=3), tmp_path / "b")
    bank = LazyBank(tmp_path / "b")
    bank.masks(0)
    shard = next(f for f in os.listdir(tmp_path / "b") if f.startswith("tasks-"))
    raw = bytearray((tmp_path / "b" / shard).read_bytes())
    raw[-5] ^= 0x10  # the last task's data
    (tmp_path / "b" / shard).write_bytes(bytes(raw))
    bank2 = LazyBank(tmp_path / "b")
    bank2.masks(0)  # task 0's bytes are intact
    with pytest.raises(BankFileError, match="checksum mismatch"):
        bank2.task(2)


# ======================================================================================
# Bad files are refused, naming the file and the problem
# ======================================================================================
@pytest.fixture
def saved(tmp_path):
    model = small(tasks=3)
    path = tmp_path / "b"
    save_bank(model, path)
    return model, path


def _shard(path) -> str:
    return str(path / next(f for f in os.listdir(path) if f.startswith("tasks-")))


def _fresh():
    return convert.convert_(lenet(32), SupsupConfig(seed=5))


def _rewrite_manifest(path, edit):
    doc = json.loads((path / checkpoint.MANIFEST).read_text())
    edit(doc)
    doc["body_sha256"] = sha256_hex(canonical_json(doc["body"]).encode())
    (path / checkpoint.MANIFEST).write_text(json.dumps(doc))


BAD_FILES = {
    "truncated shard": (lambda p: _truncate(_shard(p), 100), "truncated"),
    "truncated manifest": (lambda p: _truncate(str(p / checkpoint.MANIFEST), 40), "manifest"),
    "empty manifest": (lambda p: _truncate(str(p / checkpoint.MANIFEST), 10**9), "manifest"),
    "bit flip in mask data": (lambda p: _flip(_shard(p), -3), "checksum mismatch"),
    "bit flip in shard header": (lambda p: _flip(_shard(p), 20), "header checksum"),
    "bit flip in manifest": (lambda p: _flip(str(p / checkpoint.MANIFEST), 300), "manifest"),
    "missing shard": (lambda p: os.unlink(_shard(p)), "missing"),
    "missing manifest": (lambda p: os.unlink(p / checkpoint.MANIFEST), "manifest.json is missing"),
    "garbage appended": (lambda p: open(_shard(p), "ab").write(b"xx"), "size|bytes"),
    "future file version": (lambda p: _rewrite_manifest(p, lambda d: d.update(file_version=2)), "version 2"),
    "other mask format": (lambda p: _rewrite_manifest(p, lambda d: d["body"].update(format_version=9)),
                          "packed-format version 9"),
    "not a bank": (lambda p: _rewrite_manifest(p, lambda d: d.update(format="zip")), "not a supsup_fast"),
    "other bank's shard": (lambda p: _swap_bank_id(p), "another bank"),
}


def _truncate(path: str, drop: int) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(max(0, size - drop))


def _flip(path: str, pos: int) -> None:
    raw = bytearray(open(path, "rb").read())
    raw[pos] ^= 0x04
    open(path, "wb").write(bytes(raw))


def _swap_bank_id(path) -> None:
    # a shard whose manifest entry is valid but whose header names another bank
    _rewrite_manifest(path, lambda d: d["body"].update(bank_id="0" * 32))


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused(saved, case):
    model, path = saved
    damage, message = BAD_FILES[case]
    damage(path)
    dst = _fresh()
    before = task_state(dst)
    with pytest.raises(BankFileError, match=message) as e:
        load_bank(dst, path)
    assert str(path) in str(e.value)
    assert_same_state(before, task_state(dst))  # nothing installed from a bad bank
    with pytest.raises(BankFileError):
        verify_bank(path)


@pytest.mark.parametrize("change,message", [
    (lambda: convert.convert_(lenet(32), SupsupConfig(seed=6)), "seed"),
    (lambda: convert.convert_(lenet(48), SupsupConfig(seed=5)), "weight_shape"),
    (lambda: convert.convert_(lenet(32, bn=False), SupsupConfig(seed=5)), "different model"),
    (lambda: convert.convert_(nn.Sequential(lenet(32)), SupsupConfig(seed=5)), "different model"),
    (lambda: convert.convert_(lenet(32), SupsupConfig(seed=5, base="pretrained")), "base"),
    (lambda: convert.convert_(lenet(32), SupsupConfig(seed=5, gain=1.0)), "gain"),
])
def test_bank_of_another_model_is_refused(saved, change, message):
    _, path = saved
    with pytest.raises(BankFileError, match=message):
        load_bank(change(), path)


@pytest.mark.parametrize("cfg,field", [
    (dict(binariser="threshold"), "binariser"),
    (dict(density=0.3), "density"),
    (dict(density_schedule="erdos_renyi"), "density_schedule"),
])
def test_bank_refuses_a_model_configured_differently(saved, cfg, field):
    """Refused when loaded, lazily loaded, activated and appended to, naming the field; nothing installed."""
    _, path = saved
    other = convert.convert_(lenet(32), SupsupConfig(seed=5, **cfg))
    before = task_state(other)
    message = f"configured differently: layer '1' has {field} "
    with pytest.raises(BankFileError, match=message):
        load_bank(other, path)
    with pytest.raises(BankFileError, match=message):
        load_bank(other, path, lazy=True)
    assert_same_state(before, task_state(other))
    with LazyBank(path) as bank, pytest.raises(BankFileError, match=message):
        bank.activate(other, 0)
    add_tasks(other, 4, seed=1)
    with pytest.raises(BankFileError, match=message):
        append_task(other, path, 3)
    assert read_bank_info(path).num_tasks == 3


def test_bank_refuses_another_erdos_renyi_scale(tmp_path):
    cfg = SupsupConfig(seed=5, density_schedule="erdos_renyi", density=0.3)
    src = convert.convert_(lenet(32), cfg)
    add_tasks(src, 2, seed=1)
    save_bank(src, tmp_path / "b")
    load_bank(convert.convert_(lenet(32), cfg), tmp_path / "b")  # the same config: loads
    other = convert.convert_(lenet(32), SupsupConfig(seed=5, density_schedule="erdos_renyi", density=0.3,
                                                     erdos_renyi_scale=2.0))
    with pytest.raises(BankFileError, match="erdos_renyi_scale None in the bank and 2.0 in the model"):
        load_bank(other, tmp_path / "b")


def test_changed_signed_constant_hash_is_detected(saved, monkeypatch):
    _, path = saved
    dst = _fresh()
    with torch.no_grad():
        dst.get_submodule("3").weight[0, 0].neg_()  # as if the base regenerated differently
    with pytest.raises(BankFileError, match="sign pattern"):
        load_bank(dst, path)


# ======================================================================================
# Validation of the entry points
# ======================================================================================
def test_save_validates_its_arguments(tmp_path):
    model = small(tasks=2)
    with pytest.raises(SupsupError, match="nn.Module"):
        save_bank("model", tmp_path / "x")
    with pytest.raises(SupsupError, match="no masked layers"):
        save_bank(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x")
    with pytest.raises(SupsupError, match="2 frozen tasks"):
        save_bank(model, tmp_path / "x", task_names=["a"])
    with pytest.raises(SupsupError, match="unique"):
        save_bank(model, tmp_path / "x", task_names=["a", "a"])
    with pytest.raises(SupsupError, match="must be str"):
        save_bank(model, tmp_path / "x", task_names=["a", 3])
    with pytest.raises(SupsupError, match="JSON"):
        save_bank(model, tmp_path / "x", metadata={"loss": float("nan")})
    with pytest.raises(SupsupError, match="JSON"):
        save_bank(model, tmp_path / "x", metadata={"obj": object()})
    with pytest.raises(SupsupError, match="dict"):
        save_bank(model, tmp_path / "x", metadata=[1, 2])
    with pytest.raises(SupsupError, match="task_metadata"):
        save_bank(model, tmp_path / "x", task_metadata=[{}])
    with pytest.raises(SupsupError, match="path"):
        save_bank(model, 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SupsupError, match="not a directory"):
        save_bank(model, tmp_path / "file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("keep me")
    with pytest.raises(SupsupError, match="not a mask bank"):
        save_bank(model, tmp_path / "dir")
    assert (tmp_path / "dir" / "notes.txt").read_text() == "keep me"
    inconsistent = small(tasks=2)
    inconsistent.get_submodule("1").bank = inconsistent.get_submodule("1").bank[:1]
    with pytest.raises(SupsupError, match="disagree"):
        save_bank(inconsistent, tmp_path / "x")


def test_load_validates_its_arguments(saved, tmp_path):
    _, path = saved
    dst = _fresh()
    with pytest.raises(SupsupError, match="out of range"):
        load_bank(dst, path, tasks=[3])
    with pytest.raises(SupsupError, match="twice"):
        load_bank(dst, path, tasks=[1, 1])
    with pytest.raises(SupsupError, match="sequence"):
        load_bank(dst, path, tasks=1)
    with pytest.raises(SupsupError, match="tasks="):
        load_bank(dst, path, tasks=[0], lazy=True)
    with pytest.raises(SupsupError, match="model is on cpu"):
        load_bank(dst, path, device="meta")
    with pytest.raises(SupsupError, match="cache_bytes"):
        load_bank(dst, path, lazy=True, cache_bytes=-1)
    with pytest.raises(BankFileError, match="not a directory"):
        load_bank(dst, tmp_path / "nowhere")
    capped = convert.convert_(lenet(32), SupsupConfig(seed=5, max_tasks=2))
    with pytest.raises(SupsupError, match="max_tasks"):
        load_bank(capped, path)
    convert.begin_task(dst)
    with pytest.raises(SupsupError, match="in training"):
        load_bank(dst, path)


def test_resaving_replaces_the_bank_and_removes_old_shards(tmp_path):
    path = tmp_path / "b"
    save_bank(small(tasks=2), path)
    old = set(os.listdir(path))
    (path / ".manifest.json.0123456789abcdef.tmp").write_bytes(b"left by a crash")
    model = small(tasks=3)
    save_bank(model, path)
    files = set(os.listdir(path))
    assert not (old - {checkpoint.MANIFEST, checkpoint.LOCK}) & files
    assert not any(f.endswith(".tmp") for f in files)
    dst = _fresh()
    load_bank(dst, path)
    assert_same_state(task_state(model), task_state(dst))


# ======================================================================================
# Crash safety: a writer killed at any moment leaves the previous bank intact
# ======================================================================================
def _writer(path, mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "_bank_writer.py"), str(path), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, line: str, timeout: float = 120.0) -> list:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.stdout.readline()
        if not out:
            raise AssertionError(f"writer exited early: {seen} {proc.stderr.read()}")
        seen.append(out.strip())
        if out.strip() == line:
            return seen
    raise AssertionError(f"writer never printed {line!r}: {seen}")


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _assert_bank_is_version(path, version: int, tasks: int = 8) -> None:
    want = versioned_model(version)
    if tasks > 8:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        add_tasks(want, tasks - 8, seed=99)
        torch.set_num_threads(threads)
    dst = convert.convert_(lenet(), SupsupConfig(seed=7))
    info = load_bank(dst, path)
    assert info.metadata.get("version") == version and info.num_tasks == tasks
    assert_same_state(task_state(want), task_state(dst))


@pytest.mark.parametrize("mode", ["pause-mid-shard", "pause-manifest-replace", "pause-append"])
def test_writer_killed_mid_save_leaves_previous_bank(tmp_path, mode):
    path = tmp_path / "bank"
    proc = _writer(path, mode)
    try:
        _wait_for(proc, "saved 1")
        _wait_for(proc, "paused")
    finally:
        _kill(proc)
    if mode == "pause-mid-shard":  # the half-written temp file is there, and ignored
        assert any(f.endswith(".tmp") for f in os.listdir(path))
    _assert_bank_is_version(path, 1)
    verify_bank(path)
    if mode == "pause-append":  # the interrupted append can simply be redone
        model = versioned_model(1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        add_tasks(model, 1, seed=99)
        torch.set_num_threads(threads)
        append_task(model, path, 8, name="late")
        _assert_bank_is_version(path, 1, tasks=9)


def test_writer_killed_at_random_moments_leaves_a_complete_bank(tmp_path):
    path = tmp_path / "bank"
    rng = torch.Generator().manual_seed(0)
    for trial in range(2):
        proc = _writer(path, "loop")
        try:
            _wait_for(proc, "saved 1")
            time.sleep(0.05 + 0.5 * float(torch.rand((), generator=rng)))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        printed = [int(s.split()[1]) for s in proc.stdout.read().split("\n") if s.startswith("saved")]
        proc.stdout.close()
        proc.stderr.close()
        last = max([1] + printed)
        # complete: the last version reported, or the next if it finished before the kill landed
        version = read_bank_info(path).metadata["version"]
        assert version in (last, last + 1), (version, last)
        _assert_bank_is_version(path, version)
        shutil.rmtree(path)
