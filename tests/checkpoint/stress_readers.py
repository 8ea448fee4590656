"""Readers against a writer that re-saves the bank without pause: every open must give a complete bank.

``python tests/checkpoint/stress_readers.py [SECONDS] [--mode eager|lazy|verify|all]`` starts
``_bank_writer.py PATH loop`` (a second process replacing the bank with a new version, 8 tasks
in several shards, as fast as it can) and opens the bank over and over in this process for
``SECONDS`` (default 20). Each open must either load a whole version, bit for bit the bank that
``versioned_model(version)`` saves, or fail; failures are counted by error message. The tests
run a short version of this (``test_faults.py``); this script is the longer soak.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bank_writer import lenet, versioned_model  # noqa: E402

from supsup_fast import checkpoint, convert  # noqa: E402
from supsup_fast.config import SupsupConfig  # noqa: E402
from supsup_fast.errors import BankFileError  # noqa: E402

MODES = ("eager", "lazy", "verify")


def _expected(version: int, cache: dict) -> dict:
    if version not in cache:
        m = versioned_model(version)
        cache[version] = {n: b.clone() for n, b in m.named_buffers() if n.endswith((".bank", "running_mean"))}
    return cache[version]


def _one_open(path: str, mode: str, model, cache: dict) -> None:
    """Open the bank once; an AssertionError if what was read is not one complete version."""
    if mode == "eager":
        info = checkpoint.load_bank(model, path)
        want = _expected(info.metadata["version"], cache)
        have = dict(model.named_buffers())
        for n, v in want.items():
            assert torch.equal(have[n], v), f"eager load of version {info.metadata['version']}: {n} differs"
    elif mode == "lazy":
        bank = checkpoint.load_bank(model, path, lazy=True)
        try:
            version = bank.info.metadata["version"]
            want = _expected(version, cache)
            for t in range(bank.num_tasks):
                for name, words in bank.masks(t).items():
                    assert torch.equal(words, want[f"{name}.bank"][t]), f"lazy task {t} of version {version} differs"
        finally:
            bank.close()
    else:
        checkpoint.verify_bank(path)


def stress(seconds: float, modes=MODES, path: str | None = None) -> dict:
    """Run readers for ``seconds`` against a re-saving writer; outcome counts per mode."""
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="supsup-stress-")
        path = os.path.join(tmp, "bank")
    package = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))  # the writer runs this code
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(package), HERE, os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, os.path.join(HERE, "_bank_writer.py"), path, "loop"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    counts: dict = collections.Counter()
    cache: dict = {}
    try:
        line = writer.stdout.readline()
        if not line.startswith("saved"):
            raise RuntimeError(f"writer did not start: {line!r} {writer.stderr.read()}")
        model = convert.convert_(lenet(), SupsupConfig(seed=7))
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            mode = modes[i % len(modes)]
            i += 1
            try:
                _one_open(path, mode, model, cache)
                counts[f"{mode}: complete bank"] += 1
            except BankFileError as e:
                reason = str(e).split(": ", 1)[-1][:60]
                counts[f"{mode}: BankFileError {reason}"] += 1
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        saves = sum(1 for s in writer.stdout.read().split("\n") if s.startswith("saved")) + 1
        writer.stdout.close()
        writer.stderr.close()
        counts["writer: saves completed"] = saves
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(counts)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv and not argv[0].startswith("--") else 20.0
    modes = MODES
    if "--mode" in argv:
        m = argv[argv.index("--mode") + 1]
        modes = MODES if m == "all" else (m,)
    torch.set_num_threads(1)
    counts = stress(seconds, modes)
    opens = sum(v for k, v in counts.items() if not k.startswith("writer"))
    failed = sum(v for k, v in counts.items() if "BankFileError" in k)
    for k, v in sorted(counts.items()):
        print(f"  {k:<80} {v}")
    print(f"opens: {opens}, failed: {failed} ({100.0 * failed / max(opens, 1):.2f}%)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
