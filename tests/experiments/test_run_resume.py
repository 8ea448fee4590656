"""``supsup-fast run`` loses no work and mixes no runs: every finished task is on disk, a killed run resumes
to the results of an uninterrupted one, ``--out`` never holds two runs, and absurd sizes are refused at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from supsup_fast import checkpoint, convert, models
from supsup_fast.cli import main
from supsup_fast.config import SupsupConfig
from supsup_fast.experiments import experiment  # noqa: F401

RUN = ["run", "--tasks", "3", "--iterations", "150", "--batch-size", "16", "--eval-images", "20", "--lr", "1e-3",
       "--checkpoints", "1", "2", "3", "--no-progress", "--threads", "1"]
TIMING = {"train_seconds", "seconds", "ms_per_inference", "total_seconds"}


def _cli(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "supsup_fast", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, **kw)


def _figures(obj):
    """``obj`` without its timings (everything else must match exactly)."""
    if isinstance(obj, dict):
        return {k: _figures(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_figures(v) for v in obj]
    return obj


def _interruptible():
    """In the child: Ctrl-C interrupts, even where this process was started with SIGINT ignored (a
    background job of a non-interactive shell), which the child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _results(out):
    return json.loads((out / "results.json").read_text())


def _bank_state(bank) -> dict:
    model = models.lenet_300_100(100)
    convert.convert_(model, SupsupConfig(binariser="threshold", seed=0))
    checkpoint.load_bank(model, bank)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _wait_for_tasks(out, done: int, proc, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            res = _results(out)
        except (FileNotFoundError, ValueError):
            res = None
        if res and len(res.get("per_task", [])) >= done:
            return res
        time.sleep(0.02)
    raise AssertionError(f"no task finished in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = _cli([*RUN, "--out", str(out)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_to_the_uninterrupted_results(sig, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = _cli([*RUN, "--out", str(out)], preexec_fn=_interruptible)
    _wait_for_tasks(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    partial = _results(out)
    # killed mid-run: finished tasks are on disk, marked incomplete, bank and results agree
    assert partial["complete"] is False and 1 <= len(partial["per_task"]) < 3
    assert partial["resume"]["tasks_done"] == len(partial["per_task"])
    assert checkpoint.read_bank_info(out / "bank").num_tasks >= len(partial["per_task"])
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # a clean exit that says how to continue
        assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    resumed = _cli(["run", "--resume", str(out), "--no-progress", "--threads", "1"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    whole, res = _results(uninterrupted), _results(out)
    assert res["complete"] is True and "resume" not in res
    for key in ("per_task", "vs_tasks", "final", "memory", "gg_accuracy_mean"):
        assert _figures(res[key]) == _figures(whole[key]), key
    a, b = _bank_state(out / "bank"), _bank_state(uninterrupted / "bank")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_in_process_writes_partial_results_and_resume_continues(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the third task: exit 130, two tasks saved; --resume trains only the third."""
    from supsup_fast import training

    calls = []
    real_fit = training.fit_task

    def fit(model, *a, **kw):
        calls.append(convert.num_tasks(model))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(training, "fit_task", fit)
    out = tmp_path / "run"
    argv = ["run", "--tasks", "3", "--iterations", "20", "--eval-images", "10", "--no-progress", "--out", str(out)]
    assert main(argv) == 130
    assert "2 of 3 tasks are saved" in capsys.readouterr().err
    assert _results(out)["complete"] is False and checkpoint.read_bank_info(out / "bank").num_tasks == 2
    calls.clear()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert calls == [2]  # only the third task was trained
    res = _results(out)
    assert res["complete"] and [p["task"] for p in res["per_task"]] == [0, 1, 2]
    assert checkpoint.read_bank_info(out / "bank").num_tasks == 3


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--resume", str(out)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["run", "--tasks", "1", "--iterations", "5", "--eval-images", "4", "--no-progress",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    assert "complete; nothing to resume" in capsys.readouterr().err
    assert main(["run", "--resume", str(out), "--tasks", "4", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "drop --lr --tasks" in err


def test_out_holding_another_run_is_refused_not_mixed(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["run", "--tasks", "2", "--iterations", "5", "--eval-images", "4", "--no-progress", "--out", str(out)]
    assert main(first) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    # a second run into the same folder: refused before any work, the first run untouched
    second = ["run", "--tasks", "1", "--iterations", "5", "--eval-images", "4", "--no-progress", "--out", str(out),
              "--benchmark", "rotated"]
    assert main(second) == 2
    err = capsys.readouterr().err
    assert "already holds a permuted run, complete" in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_bytes() == before
    assert checkpoint.read_bank_info(out / "bank").num_tasks == 2
    # --overwrite: the old run's files go first, so nothing of it is left beside the new one
    assert main([*second, "--overwrite"]) == 0
    res = _results(out)
    assert res["config"]["benchmark"] == "rotated" and len(res["per_task"]) == 1
    assert checkpoint.read_bank_info(out / "bank").num_tasks == 1


def test_out_holding_an_interrupted_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "bank").mkdir()  # e.g. a bank left by an earlier, killed run
    assert main(["run", "--tasks", "1", "--iterations", "5", "--no-progress", "--out", str(out)]) == 2
    assert "already holds a run's files (bank)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "100000000", "--batch-size 100000000 is larger than the 4000 training images"),
    ("--tasks", "1000000000", "--tasks 1000000000 is more than"),
    ("--outputs", "1000000000", "--outputs 1000000000 is more than"),
    ("--threads", "100000000", "--threads 100000000 is more than"),
])
def test_absurd_sizes_are_refused_at_once(flag, value, message, tmp_path):
    proc = _cli(["run", flag, value, "--no-progress", "--out", str(tmp_path / "out")])
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{flag} {value} was not refused within 60 s")
    assert proc.returncode == 2 and message in err and "Traceback" not in err
