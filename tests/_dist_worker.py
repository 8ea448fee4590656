"""The per-rank side of tests/test_distributed.py (a module, so spawned processes can import it).

Each rank writes what it ends up with to ``OUT/rank<r>.safetensors`` and ``OUT/rank<r>.json``;
the test process compares ranks with each other and with single-process runs.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from supsup_fast import checkpoint, convert, distributed
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError

DDP_STEPS = 4
PARALLEL_TASKS = 5  # after one task learned by every rank alike
PARALLEL_SEED = 11


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 48, bias=False), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 16, bias=False),
                         nn.ReLU(), nn.Linear(16, 4, bias=False))


def model() -> nn.Module:
    return convert.convert_(net(), SupsupConfig(seed=3, density=0.5))


def ddp_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 24, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def train_fn(m: nn.Module, task: int) -> None:
    """Learn one task from data that depends on the task only; randomness from the global RNG."""
    from supsup_fast.training import fit_task

    g = torch.Generator().manual_seed(500 + task)
    x = torch.randn(128, 24, generator=g)
    y = (x[:, task % 24] > 0).long() + 2 * (x[:, (task + 5) % 24] > 0).long()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    fit_task(m, batches, iterations=6, optimizer="adam", lr=0.05, progress=False)


def first_task(m: nn.Module) -> None:
    torch.manual_seed(distributed.task_seed(PARALLEL_SEED, 0))
    train_fn(m, 0)


def task_state(m: nn.Module) -> dict:
    out = {}
    for name, mod in m.named_modules():
        if hasattr(mod, "bank"):
            out[f"{name}.bank"] = mod.bank.clone()
        if hasattr(mod, "running_mean"):
            out[f"{name}.running_mean"] = mod.running_mean.clone()
            out[f"{name}.running_var"] = mod.running_var.clone()
    return out


def _ddp(rank: int, report: dict, tensors: dict) -> None:
    m = model()
    torch.manual_seed(100 + rank)  # ranks draw different initial scores: DDP must broadcast rank 0's
    convert.begin_task(m)
    ddp = distributed.wrap_ddp(m)
    report["ddp_parameters"] = [n for n, _ in ddp.named_parameters()]
    initial = {f"initial.{n}": p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(DDP_STEPS):
        x, y = ddp_batch(step, rank)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors.update(initial)
    tensors.update({f"scores.{n}": p.detach().clone() for n, p in m.named_parameters()})
    report["ddp_task"] = distributed.freeze_task(ddp)
    report["parameters_after_freeze"] = [n for n, _ in m.named_parameters()]
    # a second task: wrap again (the parameter set changed)
    torch.manual_seed(200 + rank)
    convert.begin_task(m)
    ddp = distributed.wrap_ddp(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(2):
        x, y = ddp_batch(10 + step, rank)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    distributed.freeze_task(ddp)
    # without DDP, ranks drift apart on their own data: the freeze check must notice
    torch.manual_seed(300)
    convert.begin_task(m)
    opt = torch.optim.SGD(convert.task_parameters(m), lr=5.0)
    for step in range(3):
        x, y = ddp_batch(20 + step, rank)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    try:
        distributed.freeze_task(m)
        report["diverged_freeze"] = "accepted"
    except SupsupError as e:
        report["diverged_freeze"] = str(e)
    tensors.update({f"ddp.{k}": v for k, v in task_state(m).items()})


def _parallel(rank: int, report: dict, tensors: dict, out: str) -> None:
    m = model()
    first_task(m)  # a task every rank already shares
    report["parallel_mine"] = distributed.train_tasks_parallel(m, PARALLEL_TASKS, train_fn, seed=PARALLEL_SEED)
    report["parallel_digest"] = distributed.bank_digest(m)
    tensors.update({f"parallel.{k}": v for k, v in task_state(m).items()})
    if rank == 0:
        checkpoint.save_bank(m, os.path.join(out, "bank"), task_names=[f"t{i}" for i in range(1 + PARALLEL_TASKS)])
    try:  # both ranks claim the same task: refused on every rank alike
        distributed.gather_tasks(m, [1 + PARALLEL_TASKS - 1])
        report["overlap"] = "accepted"
    except SupsupError as e:
        report["overlap"] = str(e)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    report: dict = {"rank": rank}
    tensors: dict = {}
    try:
        _ddp(rank, report, tensors)
        _parallel(rank, report, tensors, out)
    except BaseException:
        report["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
        if "error" not in report:
            dist.barrier()  # no rank tears gloo down while the other still has work in flight
        dist.destroy_process_group()
