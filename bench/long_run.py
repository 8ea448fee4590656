"""A long PermutedMNIST run (the paper's Fig. 4 goes to 2500 tasks) that can be stopped and resumed.

    nohup nice -n 19 python bench/long_run.py --tasks 1000 --out bench/results/<machine>/long-run-permuted-1000 &

Every task is trained, frozen and appended to the run's mask bank (``OUT/bank``) before the
run's state (``OUT/results.json``, ``complete: false``, ``tasks_done``) says it is done, so a
killed run loses at most the task in training: run the same command again and it loads the bank
and goes on from the next task. Task ``t``'s scores are drawn from the global generator seeded
with ``(seed, t)`` and its batches from ``(seed, t)`` too, so a resumed run trains the same masks
as one that ran through (the bank's SHA-256 check guards what was loaded).

Measured, as ``supsup-fast run`` measures it: each task's GG accuracy on its test split and on
its evaluated images (R's diagonal) after learning it; at each checkpoint, single-image task
inference (``--method``, default one-shot, per example) over all tasks learned so far with GNu,
GG on the same images, the confusion, and a row of the accuracy matrix R; average accuracy,
backward transfer and forgetting from the measured rows; peak memory, versions, CPU model.
Plots: ``accuracy_vs_tasks.png`` and ``accuracy_matrix.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from supsup_fast import checkpoint, convert, training
from supsup_fast.config import SupsupConfig
from supsup_fast.experiments import data, experiment, metrics, models, run_dir


def _checkpoints(tasks: int) -> list[int]:
    """The run's usual checkpoints (1, 2, 5, 10, ...) and every 100 tasks."""
    return sorted(set(experiment.default_checkpoints(tasks)) | set(range(100, tasks + 1, 100)))


def _write_outputs(results: dict, out: str, plots: bool) -> None:
    m = results["accuracy_matrix"]
    for kind in ("gg", "gn"):
        rows = {int(n): r for n, r in m[kind].items()}
        diag = m["gg_diagonal"][: max(rows)] if kind == "gg" and rows else None
        m[f"{kind}_metrics"] = metrics.summarise(rows, diag)
    results["peak_memory"] = experiment._peak_memory(results["config"]["device"])
    run_dir.write_json(os.path.join(out, "results.json"), results)
    if plots and results["vs_tasks"]:
        experiment.plot(results, os.path.join(out, "accuracy_vs_tasks.png"))
        metrics.plot_accuracy_matrix(m, os.path.join(out, "accuracy_matrix.png"),
                                     title=f"PermutedMNIST-5k, LeNet-300-100, {results['tasks_done']} tasks")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=100)
    ap.add_argument("--method", default="one_shot")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=None, help="stop once this many tasks are done (tests)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = experiment.ExperimentConfig(tasks=args.tasks, iterations=args.iterations, eval_images=args.eval_images,
                                      method=args.method, batch_mode="per_example", rows=1, seed=args.seed,
                                      checkpoints=_checkpoints(args.tasks), out_dir=args.out, progress=False)
    cfg.validate()
    bench = experiment.build_benchmark(cfg)
    model = models.build(cfg.arch, cfg.outputs, bench.input_shape)
    convert.convert_(model, SupsupConfig(binariser=cfg.binariser, density=cfg.density, seed=cfg.seed))
    bank = os.path.join(args.out, "bank")
    state = os.path.join(args.out, "results.json")
    if os.path.exists(state):
        with open(state) as f:
            results = json.load(f)
        if results["config"] != json.loads(json.dumps(asdict(cfg))):
            print(f"{state} was written by another configuration; use another --out", file=sys.stderr)
            return 2
        if results["complete"]:
            print(f"{args.out}: complete ({results['tasks_done']} tasks)")
            return 0
        checkpoint.load_bank(model, bank)
        done = convert.num_tasks(model)
        if done not in (results["tasks_done"], results["tasks_done"] + 1):
            print(f"{bank} holds {done} tasks, the state says {results['tasks_done']}", file=sys.stderr)
            return 2
        # a task whose mask reached the bank but not the state: measured now (its loss curve is lost)
        for t in range(results["tasks_done"], done):
            results["per_task"].append({"task": t, "gg_accuracy": experiment._gg_accuracy(model, bench, t, 128),
                                        "recovered_on_resume": True})
            results["accuracy_matrix"]["gg_diagonal"].append(experiment.gg_eval_accuracy(model, bench, cfg, t))
        results["tasks_done"] = done
        results.setdefault("resumes", []).append({"at_task": done, "time": time.time()})
        print(f"resuming {args.out} after {done} tasks")
    else:
        os.makedirs(args.out, exist_ok=True)
        results = {"config": asdict(cfg), "protocol": experiment.eval_protocol(cfg), "data": bench.describe(),
                   "environment": experiment._environment(), "per_task": [], "vs_tasks": [], "train_seconds": 0.0,
                   "tasks_done": 0, "complete": False,
                   "accuracy_matrix": {"rows_after_tasks": cfg.checkpoints, "images": "evaluated test images",
                                       "gg": {}, "gn": {}, "gg_diagonal": []}}
        done = 0
    matrix = results["accuracy_matrix"]
    stop = args.tasks if args.stop_after is None else min(args.tasks, args.stop_after)
    for t in range(done, stop):
        torch.manual_seed(data._mix_seed(cfg.seed, t, 7))  # this task's scores, whatever ran before
        stats = training.fit_task(model, bench.infinite_batches(t, cfg.batch_size, seed=cfg.seed),
                                  iterations=cfg.iterations, optimizer=cfg.optimizer, lr=cfg.lr, progress=False)
        checkpoint.append_task(model, bank, t)
        results["train_seconds"] += stats["seconds"]
        results["per_task"].append({"task": t, "gg_accuracy": experiment._gg_accuracy(model, bench, t, 128),
                                    "train_seconds": stats["seconds"], "loss_curve": experiment.loss_curve(stats["losses"])})
        matrix["gg_diagonal"].append(experiment.gg_eval_accuracy(model, bench, cfg, t))
        results["tasks_done"] = t + 1
        if t + 1 in cfg.checkpoints:
            gn = experiment.measure_task_inference(model, bench, cfg, t + 1, progress=False)
            if t + 1 > 100:  # a 1000 x 1000 confusion is too big to keep; task_inference_accuracy is its diagonal
                gn.pop("confusion")
            results["vs_tasks"].append(gn)
            matrix["gn"][str(t + 1)] = gn["per_task_accuracy"]
            matrix["gg"][str(t + 1)] = gn["per_task_gg_accuracy_same_images"]
            print(f"{t + 1} tasks: GNu {100 * gn['accuracy']:.2f}%, GG same images "
                  f"{100 * gn['gg_accuracy_same_images']:.2f}%, task inference {100 * gn['task_inference_accuracy']:.2f}%, "
                  f"{gn['ms_per_inference']:.2f} ms/inference", flush=True)
        results["complete"] = t + 1 == args.tasks
        if results["complete"]:
            results["gg_accuracy_mean"] = sum(p["gg_accuracy"] for p in results["per_task"]) / args.tasks
        _write_outputs(results, args.out, plots=t + 1 in cfg.checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
