"""The output folder of one ``supsup-fast run``: owned by one run, written so that an interrupted run resumes.

* :func:`claim` refuses a folder that already holds a run's files (``results.json``, the plot, the bank),
  unless asked to replace them (``--overwrite``: they are removed first) -- two runs never mix.
* :func:`commit_task` is called after every finished task: the task's masks are appended to the bank
  (:func:`~supsup_fast.checkpoint.append_task`, atomic), then ``results.json`` is replaced atomically with
  ``complete: false`` and a ``resume`` record (tasks done, torch's RNG state). A kill at any instant leaves
  a bank and a results file that agree on at least the tasks the results file names.
* :func:`resume` loads a folder's saved configuration, and :func:`restore` puts its finished tasks and RNG
  state back into a freshly built model, so the run continues at the next task and ends with the figures an
  uninterrupted run gives (timings aside).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import fields
from typing import Optional

import torch

from ..errors import SupsupError
from ..seed_format import UNRECORDED_SEED_FORMAT

RESULTS = "results.json"
PLOT = "accuracy_vs_tasks.png"
BANK = "bank"
#: what a run writes into its folder; a folder holding any of them holds a run
RUN_FILES = (RESULTS, RESULTS + ".tmp", PLOT, BANK)


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically: a temporary file, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_results(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, RESULTS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise SupsupError(f"{path} is not a readable results file ({type(e).__name__}: {e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("config"), dict):
        raise SupsupError(f"{path} is not the results file of a supsup-fast run (no 'config')")
    return res


def _describe(out_dir: str) -> str:
    try:
        res = _read_results(out_dir)
    except SupsupError:
        return "an unreadable results.json"
    if res is None:
        return "a run's files (" + ", ".join(n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))) + ")"
    c = res["config"]
    done = len(res.get("per_task", []))
    state = "complete" if res.get("complete") else f"interrupted after {done} of {c.get('tasks')} tasks"
    return f"a {c.get('benchmark')} run, {state}"


def claim(out_dir: str, *, overwrite: bool) -> None:
    """Make ``out_dir`` this run's folder: refuse one that holds another run unless ``overwrite`` (then its
    run files are removed, nothing else in the folder)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SupsupError(f"--out {out_dir} exists and is not a folder")
    found = [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]
    if found and not overwrite:
        raise SupsupError(f"--out {out_dir} already holds {_describe(out_dir)}; continue it with "
                          f"`supsup-fast run --resume {out_dir}`, replace it with --overwrite, or choose another --out")
    for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def resume(out_dir: str, config_cls):
    """The configuration of the interrupted run in ``out_dir`` (a ``config_cls`` instance), checked resumable."""
    res = _read_results(out_dir)
    if res is None:
        raise SupsupError(f"--resume {out_dir}: no {RESULTS} there, so no run to resume")
    if res.get("complete"):
        raise SupsupError(f"--resume {out_dir}: that run is complete; nothing to resume")
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(res["config"]) - known)
    if unknown:
        raise SupsupError(f"--resume {out_dir}: the saved configuration has settings this version does not "
                          f"know: {unknown}")
    saved = dict(res["config"])
    if "seed_format" in known:
        saved.setdefault("seed_format", UNRECORDED_SEED_FORMAT)  # runs saved before the setting was recorded
    cfg = config_cls(**saved)
    if cfg.scenario == "NNs":
        raise SupsupError(f"--resume {out_dir}: --scenario NNs runs cannot resume (the novelty test's state is not "
                          "saved per task); start it again with --overwrite")
    if not cfg.save_bank:
        raise SupsupError(f"--resume {out_dir}: that run was made with --no-bank, so its masks were not kept")
    cfg.out_dir = out_dir
    return cfg


def restore(model, out_dir: str) -> dict:
    """Load the finished tasks of the run in ``out_dir`` into ``model`` and torch's RNG state; returns the
    saved results (their ``per_task`` names the tasks restored)."""
    from ..checkpoint import load_bank, read_bank_info, save_bank

    res = _read_results(out_dir)
    state = res.get("resume") if res else None
    if not isinstance(state, dict) or state.get("tasks_done") != len(res.get("per_task", [])):
        raise SupsupError(f"--resume {out_dir}: {RESULTS} holds no consistent resume record")
    done = state["tasks_done"]
    if done:
        bank = os.path.join(out_dir, BANK)
        have = read_bank_info(bank).num_tasks
        if have < done:
            raise SupsupError(f"--resume {out_dir}: the bank holds {have} tasks but {RESULTS} names {done}")
        load_bank(model, bank, tasks=list(range(done)))
        if have > done:  # killed between the bank append and the results write: that task is trained again
            save_bank(model, bank)
    torch.set_rng_state(_unb64(state["torch_rng_state"]))
    if state.get("cuda_rng_states") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda_rng_states"]])
    return res


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def commit_task(model, out_dir: str, results: dict, *, save_bank: bool) -> None:
    """Record the task just finished (the last of ``results["per_task"]``): bank first, then results."""
    done = len(results["per_task"])
    if save_bank:
        from ..checkpoint import append_task

        append_task(model, os.path.join(out_dir, BANK), done - 1)
    results["resume"] = {"tasks_done": done, "torch_rng_state": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # scores of CUDA layers are drawn there
        results["resume"]["cuda_rng_states"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    write_json(os.path.join(out_dir, RESULTS), {**results, "complete": False})


def interrupted_message(out_dir: str) -> str:
    try:
        res = _read_results(out_dir)
    except SupsupError:
        res = None
    done = len(res.get("per_task", [])) if res else 0
    total = res["config"].get("tasks") if res else "?"
    return (f"interrupted: {done} of {total} tasks are saved in {out_dir}; continue with "
            f"`supsup-fast run --resume {out_dir}`")


__all__ = ["claim", "resume", "restore", "commit_task", "write_json", "interrupted_message", "RUN_FILES"]
