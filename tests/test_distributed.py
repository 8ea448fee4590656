"""torch.distributed: DDP over one task's scores, and task-parallel training gathered into one bank.

Two CPU processes (gloo, 127.0.0.1 only) run tests/_dist_worker.py once; the tests compare what
the ranks ended with to each other and to single-process runs of the same training.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from supsup_fast import checkpoint, convert, distributed
from supsup_fast.errors import SupsupError

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    for attempt in range(3):  # the free port can be taken between choosing it and the ranks binding it
        try:
            mp.spawn(W.worker, args=(2, free_port(), out), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    res = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            report = json.load(f)
        res.append((report, load_file(os.path.join(out, f"rank{r}.safetensors"))))
    return out, res


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran on one thread each: same reduction order
    yield
    torch.set_num_threads(threads)


# ======================================================================================
# Data parallel
# ======================================================================================
def test_ddp_sees_only_the_open_task_scores(ranks):
    _, res = ranks
    for report, _ in res:
        names = report["ddp_parameters"]
        assert names and all(n.startswith("module.") and n.endswith(".scores") for n in names)
        assert len(names) == 3  # one per masked layer; nothing from BatchNorm or frozen tasks
        assert report["parameters_after_freeze"] == []


def test_ddp_ranks_agree_and_match_one_process_on_both_batches(ranks, one_thread):
    _, ((r0, t0), (r1, t1)) = ranks
    assert r0["ddp_task"] == r1["ddp_task"] == 0
    scores = sorted(k for k in t0 if k.startswith("scores."))
    assert scores
    for k in scores:  # same scores on both ranks, bit for bit, although they started apart
        assert torch.equal(t0[k], t1[k]), k
        assert torch.equal(t0["initial." + k[len("scores."):]], t1["initial." + k[len("scores."):]])
    # one process, the same init (rank 0's), the mean loss of both ranks' batches per step
    m = W.model()
    torch.manual_seed(100)
    convert.begin_task(m)
    for n, p in m.named_parameters():
        assert torch.equal(p, t0["initial." + n])
    opt = torch.optim.SGD(convert.task_parameters(m), lr=0.5)
    for step in range(W.DDP_STEPS):
        losses = [F.cross_entropy(m(x), y) for x, y in (W.ddp_batch(step, 0), W.ddp_batch(step, 1))]
        opt.zero_grad()
        (sum(losses) / 2).backward()
        opt.step()
    moved = 0.0
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), t0["scores." + n], rtol=1e-5, atol=1e-6)
        moved += float((p.detach() - t0["initial." + n]).abs().max())
    assert moved > 1e-3  # training did change the scores


def test_ddp_freeze_gives_identical_banks_and_averaged_statistics(ranks):
    _, ((r0, t0), (r1, t1)) = ranks
    for k in (k for k in t0 if k.startswith("ddp.")):
        if k.endswith(".bank") or k.endswith("running_var") or k.endswith("running_mean"):
            # task 2 was trained without DDP and differs; tasks 0 and 1 must agree exactly
            assert torch.equal(t0[k][:2], t1[k][:2]), k
    assert "disagree" in r0["diverged_freeze"] and "disagree" in r1["diverged_freeze"]


# ======================================================================================
# Task parallel
# ======================================================================================
def test_task_parallel_bank_equals_serial_training(ranks, one_thread):
    out, ((r0, t0), (r1, t1)) = ranks
    assert r0["parallel_mine"] == [1, 3, 5] and r1["parallel_mine"] == [2, 4]
    assert r0["parallel_digest"] == r1["parallel_digest"]
    serial = W.model()
    W.first_task(serial)
    for t in range(1, 1 + W.PARALLEL_TASKS):
        torch.manual_seed(distributed.task_seed(W.PARALLEL_SEED, t))
        W.train_fn(serial, t)
    assert distributed.bank_digest(serial) == r0["parallel_digest"]
    want = W.task_state(serial)
    for k, v in want.items():
        assert torch.equal(v, t0["parallel." + k]) and torch.equal(v, t1["parallel." + k]), k
    # the bank rank 0 saved loads into a fresh model as the serial model's tasks
    fresh = W.model()
    info = checkpoint.load_bank(fresh, os.path.join(out, "bank"))
    assert info.task_names == [f"t{i}" for i in range(6)]
    assert distributed.bank_digest(fresh) == distributed.bank_digest(serial)


def test_overlapping_task_ids_are_refused_on_every_rank(ranks):
    _, ((r0, _), (r1, _)) = ranks
    assert "exactly once" in r0["overlap"] and "exactly once" in r1["overlap"]


# ======================================================================================
# Single-process checks of the helpers
# ======================================================================================
def test_task_seed_and_assignment():
    assert distributed.task_seed(0, 1) == distributed.task_seed(0, 1) != distributed.task_seed(0, 2)
    assert distributed.task_seed(1, 1) != distributed.task_seed(0, 1)
    assert distributed.assign_tasks(5, 2, 0) == [0, 2, 4] and distributed.assign_tasks(5, 2, 1) == [1, 3]
    with pytest.raises(SupsupError):
        distributed.assign_tasks(5, 2, 2)


def test_helpers_need_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    m = W.model()
    with pytest.raises(SupsupError, match="init_process_group"):
        distributed.gather_tasks(m, [])
    with pytest.raises(SupsupError, match="init_process_group"):
        distributed.train_tasks_parallel(m, 2, W.train_fn)
    convert.begin_task(m)
    with pytest.raises(SupsupError, match="init_process_group"):
        distributed.wrap_ddp(m)
    with pytest.raises(SupsupError, match="init_process_group"):
        distributed.freeze_task(m)


def test_bank_digest_follows_the_bits():
    m = W.model()
    W.first_task(m)
    d = distributed.bank_digest(m)
    assert d == distributed.bank_digest(m, [0])
    m.get_submodule("0").bank[0, 0, 0] ^= 1
    assert distributed.bank_digest(m) != d
