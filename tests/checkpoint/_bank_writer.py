"""Models with reproducible frozen tasks, and a bank writer that tests kill at chosen moments.

``python tests/_bank_writer.py PATH MODE`` writes banks of :func:`versioned_model` and prints
``saved V`` after each complete save; in the ``pause-*`` modes it prints ``paused`` at the chosen
point of the next save and sleeps, waiting to be killed.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from supsup_fast import checkpoint, convert
from supsup_fast.checkpoint import _files
from supsup_fast.config import SupsupConfig


def lenet(width: int = 300, bn: bool = True) -> nn.Sequential:
    """LeNet-300-100 (optionally narrower), with a BatchNorm to exercise per-task statistics."""
    layers = [nn.Flatten(), nn.Linear(784, width, bias=False), nn.ReLU(), nn.Linear(width, 100, bias=False)]
    if bn:
        layers.append(nn.BatchNorm1d(100))
    layers += [nn.ReLU(), nn.Linear(100, 10, bias=False)]
    return nn.Sequential(*layers)


def add_tasks(model: nn.Module, count: int, seed: int) -> None:
    """Learn ``count`` tasks reproducibly: random scores, one training-mode batch for the statistics."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _ in range(count):
            convert.begin_task(model)
            model.train()
            with torch.no_grad():
                model(torch.randn(16, 784) * 2 + 1)
            convert.freeze_task(model)
    finally:
        torch.random.set_rng_state(gen_state)


def versioned_model(version: int, tasks: int = 8, seed: int = 7) -> nn.Module:
    """Version ``v`` of a bank's contents: same model, different tasks per version.

    Built on one thread: BatchNorm statistics are float reductions whose rounding depends on
    the thread count, and the test compares a writer process's bank with its own rebuild bitwise.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = convert.convert_(lenet(), SupsupConfig(seed=seed))
        add_tasks(model, tasks, seed=1000 + version)
    finally:
        torch.set_num_threads(threads)
    return model


def _pause_in(fn_owner, name: str, when):
    original = getattr(fn_owner, name)

    def paused(*args, **kwargs):
        if when(*args):
            print("paused", flush=True)
            time.sleep(600)
        return original(*args, **kwargs)

    setattr(fn_owner, name, paused)


def main(path: str, mode: str) -> None:
    if mode == "loop":
        v = 1
        while True:
            checkpoint.save_bank(versioned_model(v), path, metadata={"version": v})
            print(f"saved {v}", flush=True)
            v += 1
    checkpoint.save_bank(versioned_model(1), path, metadata={"version": 1})
    print("saved 1", flush=True)
    if mode == "pause-mid-shard":  # half of a task shard written to its temp file
        original = _files.write_all

        def half(f, data):
            if len(data) > 100_000:
                f.write(data[: len(data) // 2])
                f.flush()
                print("paused", flush=True)
                time.sleep(600)
            original(f, data)

        _files.write_all = half  # where atomic_write looks it up
        checkpoint.save_bank(versioned_model(2), path, metadata={"version": 2})
    elif mode == "pause-manifest-replace":  # new shards in place, manifest about to be replaced
        _pause_in(_files.os, "replace", lambda src, dst: os.path.basename(dst) == checkpoint.MANIFEST)
        checkpoint.save_bank(versioned_model(2), path, metadata={"version": 2})
    elif mode == "pause-append":  # appended shard in place, manifest half written
        model = versioned_model(1)
        torch.set_num_threads(1)
        add_tasks(model, 1, seed=99)
        original = _files.write_all

        def half_manifest(f, data):
            if data.startswith(b'{"format"'):
                f.write(data[: len(data) // 2])
                f.flush()
                print("paused", flush=True)
                time.sleep(600)
            original(f, data)

        _files.write_all = half_manifest  # where atomic_write looks it up
        checkpoint.append_task(model, path, 8, name="late")
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("not killed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
