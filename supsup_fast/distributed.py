"""``torch.distributed`` for SupSup: data-parallel training of one task, task-parallel training of many.

Two ways to use several processes:

* **Data parallel** (one task at a time, every rank on a shard of its data): wrap the model with
  :func:`wrap_ddp` after ``begin_task``; the open task's scores are the only parameters, so
  DistributedDataParallel averages exactly their gradients. Finish with :func:`freeze_task`,
  which averages the open task's BatchNorm statistics over the ranks, freezes, and checks that
  every rank froze the same bits.
* **Task parallel** (ranks learn disjoint tasks): :func:`train_tasks_parallel` gives task ``t`` to
  rank ``t % world_size``, seeds it with :func:`task_seed`, and :func:`gather_tasks` then collects
  every rank's frozen tasks into every rank's bank in task order. Because each task's training
  depends only on its seed, the bank equals the one serial training with the same seeds builds.

Only tensors cross process boundaries (``all_gather`` / ``all_reduce`` of fixed-size tensors);
nothing is pickled. Collectives follow ``group`` (default: the world) and work with any backend
that supports ``uint8``/``int64``/float tensors (gloo on CPU, NCCL on GPU).

Task-parallel launch (``torchrun`` sets the rendezvous; gloo on CPU, NCCL with ``--device cuda``)::

    torchrun --standalone --nproc-per-node 2 -m supsup_fast.distributed --tasks 4 --steps 50 --out bank/
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import convert
from .checkpoint.model_state import (
    bank_modules,
    install_tasks,
    model_device,
    model_fingerprint,
    num_frozen_tasks,
    require_no_open_task,
    task_stacks,
    task_tensors,
)
from .errors import SupsupError

__all__ = ["task_seed", "bank_digest", "wrap_ddp", "freeze_task", "gather_tasks", "train_tasks_parallel",
           "assign_tasks"]


def task_seed(seed: int, task: int) -> int:
    """The RNG seed task ``task`` trains with: a hash of ``(seed, task)``, the same on every rank."""
    digest = hashlib.sha256(f"supsup_fast.task_seed:{int(seed)}:{int(task)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise SupsupError("torch.distributed is not initialised; call torch.distributed.init_process_group first")


def _modules(model: nn.Module):
    mods = bank_modules(model)
    return mods, num_frozen_tasks(mods)


def _task_bytes(mods, t: int) -> torch.Tensor:
    """Frozen task ``t``'s state of every task module, as one flat ``uint8`` tensor (fixed layout)."""
    parts = []
    for name, m in mods:
        for v in task_tensors(name, m, t, t).values():
            parts.append(v.detach().contiguous().reshape(-1).view(torch.uint8))
    return torch.cat(parts)


def _split_task_bytes(mods, flat: torch.Tensor) -> dict:
    """Inverse of :func:`_task_bytes` over a ``[T, nbytes]`` stack: ``{module: {field: [T, ...]}}``."""
    out, pos, t = {}, 0, flat.shape[0]
    for name, m in mods:
        out[name] = {}
        for f, like in task_stacks(m).items():
            shape = tuple(like.shape[1:])
            n = like.element_size() * int(torch.Size(shape).numel())
            chunk = flat[:, pos:pos + n].contiguous()
            out[name][f] = chunk.view(like.dtype).reshape((t,) + shape)
            pos += n
    return out


def bank_digest(model: nn.Module, tasks: Optional[Sequence[int]] = None) -> str:
    """SHA-256 of the frozen tasks' bits and statistics (all tasks, or ``tasks``) in task order."""
    mods, count = _modules(model)
    h = hashlib.sha256()
    for t in (range(count) if tasks is None else tasks):
        h.update(_task_bytes(mods, int(t)).cpu().numpy().tobytes())
    return h.hexdigest()


def _comm_device(model: nn.Module, group) -> torch.device:
    """NCCL needs CUDA tensors; gloo and the rest take the model's device."""
    dev = model_device(model)
    if dist.get_backend(group) == "nccl" and dev.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def _digest_tensor(text: str, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8).to(device)


def _agree(text: str, what: str, group, device) -> None:
    """Raise the same :class:`SupsupError` on every rank unless all ranks hold the same ``text``."""
    got = _all_gather(_digest_tensor(text, device), group)
    bad = [r for r, g in enumerate(got) if not torch.equal(g, got[0])]
    if bad:
        raise SupsupError(f"ranks disagree on {what}: rank(s) {bad} differ from rank 0")


# ======================================================================================
# Data parallel: one task, many ranks
# ======================================================================================
def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """Wrap ``model`` in DistributedDataParallel for training its open task.

    The open task's scores are the model's only parameters, so DDP synchronises them (and only
    them); call this after ``begin_task`` and wrap again for the next task. Buffers are not
    broadcast by default (``broadcast_buffers=False``): they include every frozen task's bits,
    which are identical on every rank anyway; the open task's BatchNorm statistics are averaged
    once by :func:`freeze_task` instead of being overwritten by rank 0's at every step.
    """
    _require_dist()
    mods, _ = _modules(model)
    if not any(m.in_training for _, m in mods):
        raise SupsupError("wrap_ddp: no task is in training; call begin_task(model) first (DDP needs the scores)")
    extra = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith("scores")]
    if extra:
        raise SupsupError(f"wrap_ddp: trainable parameters besides the open task's scores: {extra[:4]}; "
                          "freeze them (requires_grad_(False)) so ranks train the same thing")
    ddp_kwargs.setdefault("broadcast_buffers", False)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


@torch.no_grad()
def freeze_task(model: nn.Module, group=None, check: bool = True) -> int:
    """Freeze the open task on every rank: average its BatchNorm statistics, freeze, check bits agree.

    Returns the frozen task's id. With ``check``, a :class:`SupsupError` is raised on every rank
    if the ranks froze different masks (e.g. scores that diverged because DDP was not used); the
    task is frozen by then, so each rank keeps its own bits: do not save or gather them.
    """
    _require_dist()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    mods, _ = _modules(model)
    world = dist.get_world_size(group)
    for _, m in mods:
        if not m.in_training:
            continue
        for name in ("task_mean", "task_var"):
            v = getattr(m, name, None)
            if v is not None:
                dev = _comm_device(model, group)
                buf = v.to(device=dev, dtype=torch.float64)
                dist.all_reduce(buf, group=group)
                v.copy_((buf / world).to(v))
    t = convert.freeze_task(model)
    if check:
        _agree(bank_digest(model, [t]), f"the frozen bits of task {t}", group, _comm_device(model, group))
    return t


# ======================================================================================
# Task parallel: disjoint tasks, one bank
# ======================================================================================
def assign_tasks(num_tasks: int, world_size: int, rank: int) -> list[int]:
    """Round-robin: rank ``r`` learns tasks ``r, r + world_size, ...``."""
    if num_tasks < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise SupsupError(f"assign_tasks: bad arguments num_tasks={num_tasks}, world_size={world_size}, rank={rank}")
    return list(range(rank, num_tasks, world_size))


@torch.no_grad()
def gather_tasks(model: nn.Module, local_task_ids: Sequence[int], group=None) -> int:
    """Collect every rank's new frozen tasks into every rank's model, in global task order.

    Each rank's model holds ``P`` frozen tasks shared by all ranks (identical; checked) followed
    by ``len(local_task_ids)`` tasks it learned itself; ``local_task_ids[i]`` is the global index
    of its ``P + i``-th task. Over all ranks the ids must be exactly ``P .. P + n - 1``. Afterwards
    every rank holds the same ``P + n`` tasks. Collective: every rank of ``group`` must call it.

    Returns the number of tasks now in the model.
    """
    _require_dist()
    mods, count = _modules(model)
    require_no_open_task(mods, "gather_tasks")
    ids = [int(i) for i in local_task_ids]
    k = len(ids)
    if k > count:
        raise SupsupError(f"gather_tasks: {k} local task ids but the model holds only {count} frozen tasks")
    prefix = count - k
    dev = _comm_device(model, group)
    world = dist.get_world_size(group)

    fp, _ = model_fingerprint(mods)
    _agree(json.dumps(fp, sort_keys=True), "the model (fingerprint)", group, dev)
    _agree(str(prefix) + ":" + bank_digest(model, range(prefix)), "the shared tasks before the gathered ones",
           group, dev)

    counts = [int(c) for c in _all_gather(torch.tensor([k], dtype=torch.int64, device=dev), group)]
    kmax = max(counts)
    padded = torch.full((max(kmax, 1),), -1, dtype=torch.int64, device=dev)
    padded[:k] = torch.tensor(ids, dtype=torch.int64)
    all_ids = [g[:c].tolist() for g, c in zip(_all_gather(padded, group), counts)]
    flat_ids = sorted(i for r in all_ids for i in r)
    n = len(flat_ids)
    if flat_ids != list(range(prefix, prefix + n)):
        raise SupsupError(f"gather_tasks: the ranks' task ids {all_ids} must together be {prefix}..{prefix + n - 1} "
                          "exactly once each")

    nbytes = _task_bytes(mods, 0).numel() if count else 0
    if kmax == 0 or nbytes == 0:
        return count
    local = torch.zeros((kmax, nbytes), dtype=torch.uint8, device=dev)
    for i in range(k):
        local[i] = _task_bytes(mods, prefix + i).to(dev)
    gathered = _all_gather(local, group)
    merged = torch.empty((prefix + n, nbytes), dtype=torch.uint8, device=dev)
    for i in range(prefix):
        merged[i] = _task_bytes(mods, i).to(dev)
    for r in range(world):
        for j, gid in enumerate(all_ids[r]):
            merged[gid] = gathered[r][j]
    fields = _split_task_bytes(mods, merged)
    for name, m in mods:
        dev_m = m.bank.device if "mask" in fields[name] else m.running_mean.device
        install_tasks(m, {f: v.to(dev_m) for f, v in fields[name].items()})
    return prefix + n


def train_tasks_parallel(
    model: nn.Module,
    num_tasks: int,
    train_fn: Callable[[nn.Module, int], object],
    *,
    seed: int = 0,
    group=None,
) -> list[int]:
    """Learn tasks ``P .. P + num_tasks - 1`` across the ranks of ``group``, then gather them everywhere.

    Task ``t`` (global index) is learned by rank ``(t - P) % world_size`` (:func:`assign_tasks`):
    ``torch.manual_seed(task_seed(seed, t))``, then ``train_fn(model, t)``, which must learn
    exactly one new frozen task (e.g. ``lambda m, t: fit_task(m, data(t), iterations=...)``).
    ``P`` is the number of tasks the model already holds (the same on every rank).

    Serial training with the same seeds -- ``for t: torch.manual_seed(task_seed(seed, t));
    train_fn(model, t)`` -- builds the same bank, provided ``train_fn``'s randomness comes from
    the global torch RNG (or ``t``) and the config's ``score_init`` is not ``"transfer"`` (which
    makes each task depend on all earlier ones).

    Returns the global indices of the tasks this rank learned.
    """
    _require_dist()
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
        raise SupsupError(f"num_tasks must be a non-negative int, got {num_tasks!r}")
    if not callable(train_fn):
        raise SupsupError("train_fn must be callable as train_fn(model, task)")
    mods, prefix = _modules(model)
    require_no_open_task(mods, "train_tasks_parallel")
    transfer = [n for n, m in mods if getattr(m, "score_init", None) == "transfer"]
    if transfer:
        raise SupsupError("train_tasks_parallel: score_init='transfer' starts each task from the mean of all "
                          f"earlier tasks (layers {transfer[:3]}), which disjoint ranks cannot reproduce; "
                          "use 'kaiming_uniform'")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = [prefix + t for t in assign_tasks(num_tasks, world, rank)]
    for t in mine:
        before = convert.num_tasks(model)
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.manual_seed(task_seed(seed, t))
            train_fn(model, t)
        after = convert.num_tasks(model)
        if after != before + 1 or any(m.in_training for _, m in mods):
            raise SupsupError(f"train_tasks_parallel: train_fn(model, {t}) must learn exactly one new frozen task "
                              f"(begin, train, freeze); the model went from {before} to {after} frozen tasks")
    gather_tasks(model, mine, group)
    return mine


def _cuda_devices(model: nn.Module) -> list:
    devs = {b.device.index for b in model.buffers() if b.device.type == "cuda"}
    return sorted(d for d in devs if d is not None)


# ======================================================================================
# python -m supsup_fast.distributed  (under torchrun): task-parallel PermutedMNIST-5k demo
# ======================================================================================
def _demo_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300, bias=False), nn.ReLU(), nn.Linear(300, 100, bias=False),
                         nn.ReLU(), nn.Linear(100, 10, bias=False))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import save_bank
    from .config import SupsupConfig
    from .experiments.data import PermutedMNIST, mnist_5k
    from .training import evaluate, fit_task

    p = argparse.ArgumentParser(prog="python -m supsup_fast.distributed",
                                description="Task-parallel SupSup training of LeNet-300-100 on PermutedMNIST-5k "
                                            "(run under torchrun).")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    p.add_argument("--out", default=None, help="rank 0 saves the bank here")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        bench = PermutedMNIST(mnist_5k(), args.tasks)
        model = convert.convert_(_demo_model().to(device), SupsupConfig(seed=args.seed))

        def train(m, t):
            fit_task(m, bench.infinite_batches(t, args.batch_size, seed=args.seed), iterations=args.steps,
                     optimizer="adam", lr=1e-2, progress=False)

        mine = train_tasks_parallel(model, args.tasks, train, seed=args.seed)
        acc = {t: round(evaluate(model, bench.test_loader(t, 500), task=t)["accuracy"], 4) for t in mine}
        print(json.dumps({"rank": rank, "trained": mine, "accuracy": acc, "num_tasks": convert.num_tasks(model),
                          "bank_sha256": bank_digest(model)}), flush=True)
        if rank == 0 and args.out:
            save_bank(model, args.out, task_names=[f"permuted-{t}" for t in range(args.tasks)],
                      metadata={"benchmark": bench.describe(), "steps": args.steps, "seed": args.seed,
                                "world_size": dist.get_world_size()})
        dist.barrier()  # no rank tears the process group down while another still has work in flight
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised under torchrun
    raise SystemExit(main())
