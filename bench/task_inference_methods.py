"""Every task-inference method on one saved run's masks, on the same test batches: accuracy and time.

    python bench/task_inference_methods.py RUN_DIR [--variants one_shot binary shortlist:rows:4:16 ...]
                                           [--repeats 3] [--batch-mode ...] [--rows ...] [--objective ...]
                                           [--out results.json]

``RUN_DIR`` is a ``supsup-fast run`` output folder (its ``results.json`` and ``bank/``). The model
and benchmark are rebuilt from the run's config, the bank is loaded, and each variant is measured
by :func:`supsup_fast.experiment.measure_task_inference` -- the CLI's own measurement, protocol
included (class-mixed test batches, seeded) -- on exactly the images the run used. Variants:
``one_shot``, ``binary``, ``gradient_descent``, ``shortlist:<by>[:<size>[:<rows>[:<score>]]]`` (``by``:
``auto``, ``rows``, ``one_shot`` or ``binary``; a size of at least the number of tasks scores every task;
``score``: ``entropy`` or ``margin``). Inference settings other than the method (objective, batch mode, rows) are the
run's unless overridden.

Time: every repeat measures all variants one after another (side by side on the same machine
state), each repeat starting one variant later than the one before; reported are the median seconds over repeats, the spread, and the median over repeats of
each variant's time divided by binary search's in the same repeat. Accuracy must come out the
same in every repeat (the methods are deterministic); the script stops if it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from supsup_fast import checkpoint, convert
from supsup_fast.config import SupsupConfig
from supsup_fast.experiments import models
from supsup_fast.experiments.experiment import ExperimentConfig, build_benchmark, eval_protocol, measure_task_inference
from supsup_fast.info import cpu_model

DEFAULT_VARIANTS = ["one_shot", "binary", "gradient_descent", "shortlist:auto"]


def parse_variant(text: str) -> dict:
    """``"shortlist:rows:4:16:margin"`` -> ``{"method": "shortlist", "shortlist_by": "rows", "shortlist": 4,
    "shortlist_rows": 16, "shortlist_score": "margin"}`` (the last three optional: the config's values)."""
    parts = text.split(":")
    if parts[0] != "shortlist":
        if len(parts) != 1:
            raise SystemExit(f"variant {text!r}: only shortlist takes parameters "
                             "(shortlist:<by>[:<size>[:<rows>[:<score>]]])")
        return {"method": parts[0]}
    if not 2 <= len(parts) <= 5:
        raise SystemExit(f"variant {text!r}: write shortlist:<by>[:<size>[:<rows>[:<score>]]]")
    out = {"method": "shortlist", "shortlist_by": parts[1]}
    if len(parts) > 2:
        out["shortlist"] = int(parts[2])
    if len(parts) > 3:
        out["shortlist_rows"] = int(parts[3])
    if len(parts) > 4:
        out["shortlist_score"] = parts[4]
    return out


def load_run(run_dir: str, overrides: dict):
    """``(cfg, bench, model)`` of a saved run: the config it ran with, its benchmark and its masks."""
    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    cfg = ExperimentConfig(**{k: v for k, v in saved["config"].items() if k in known})
    cfg = dataclasses.replace(cfg, progress=False, compare_methods=[], **overrides)
    cfg.validate()
    bench = build_benchmark(cfg)
    model = models.build(cfg.arch, cfg.outputs, bench.input_shape)
    convert.convert_(model, SupsupConfig(binariser=cfg.binariser, density=cfg.density, seed=cfg.seed))
    model.to(cfg.device)
    checkpoint.load_bank(model, os.path.join(run_dir, "bank"))
    model.eval()
    return cfg, bench, model, saved


def within(confusion: list, d: int) -> float:
    """Share of images whose inferred task is at most ``d`` task ids from the true one."""
    total = sum(map(sum, confusion))
    near = sum(c for i, row in enumerate(confusion) for j, c in enumerate(row) if abs(i - j) <= d)
    return near / max(total, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-mode", choices=("batch", "per_example"), default=None)
    p.add_argument("--rows", default=None, help="batch mode: rows used ('all' or a number)")
    p.add_argument("--objective", choices=("entropy", "g"), default=None)
    p.add_argument("--tasks", type=int, default=None, help="measure over the first TASKS tasks (default: all)")
    p.add_argument("--eval-images", type=int, default=None, help="test images per task (default: the run's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.batch_mode:
        overrides["batch_mode"] = args.batch_mode
    if args.rows:
        overrides["rows"] = None if args.rows == "all" else int(args.rows)
    if args.objective:
        overrides["objective"] = args.objective
    if args.eval_images:
        overrides["eval_images"] = args.eval_images
    cfg, bench, model, saved = load_run(args.run_dir, overrides)
    tasks = args.tasks or convert.num_tasks(model)
    if len(set(args.variants)) != len(args.variants):
        raise SystemExit(f"--variants names a variant twice: {args.variants}")
    variants = [(v, parse_variant(v)) for v in args.variants]
    rows = {v: {"variant": v, **params, "seconds": []} for v, params in variants}
    for r in range(args.repeats):
        # each repeat starts one variant later, so no variant always runs first (cold) or last
        for v, params in variants[r % len(variants):] + variants[:r % len(variants)]:
            got = measure_task_inference(model, bench, dataclasses.replace(cfg, **params), tasks, progress=False)
            row = rows[v]
            fixed = {k: got[k] for k in ("accuracy", "task_inference_accuracy", "inference_accuracy",
                                         "gg_accuracy_same_images", "images", "inferences", "confusion")}
            if r == 0:
                row.update(fixed)
                row["task_inference_within_1"] = within(got["confusion"], 1)
                row["min_classes_per_batch"] = got["min_classes_per_batch"]
            elif any(row[k] != fixed[k] for k in fixed):
                raise SystemExit(f"{v}: results changed between repeats")
            row["seconds"].append(got["seconds"])
            print(f"repeat {r + 1}/{args.repeats} {v:>22}: task inference {100 * got['task_inference_accuracy']:6.2f}% "
                  f"in {got['seconds']:.2f} s", file=sys.stderr, flush=True)
    base = rows.get("binary")
    for row in rows.values():
        row["median_seconds"] = statistics.median(row["seconds"])
        row["ms_per_inference"] = 1e3 * row["median_seconds"] / max(row["inferences"], 1)
        if base is not None:
            row["time_vs_binary"] = statistics.median(a / b for a, b in zip(row["seconds"], base["seconds"]))
    c = cfg
    print(f"{c.benchmark} on {c.data}, {c.arch} ({c.outputs} outputs), {tasks} tasks, objective {c.objective}, "
          f"{c.batch_mode} (rows {'all' if c.rows is None else c.rows}), {rows[variants[0][0]]['inferences']} inferences "
          f"on {rows[variants[0][0]]['images']} images; median of {args.repeats} repeats")
    print(f"{'method':>22} | {'task-inf':>8} | {'±1 task':>8} | {'GNu acc':>8} | {'GG same':>8} | {'ms/inf':>8} | "
          f"{'spread':>13} | {'x binary':>8}")
    for row in rows.values():
        spread = f"{1e3 * min(row['seconds']) / row['inferences']:.1f}-{1e3 * max(row['seconds']) / row['inferences']:.1f}"
        ratio = f"{row['time_vs_binary']:.2f}" if "time_vs_binary" in row else "-"
        print(f"{row['variant']:>22} | {100 * row['task_inference_accuracy']:7.2f}% | {100 * row['task_inference_within_1']:7.2f}% | "
              f"{100 * row['accuracy']:7.2f}% | {100 * row['gg_accuracy_same_images']:7.2f}% | {row['ms_per_inference']:8.2f} | "
              f"{spread:>13} | {ratio:>8}")
    if args.out:
        out = {"run_config": dataclasses.asdict(cfg), "protocol": eval_protocol(cfg), "tasks": tasks,
               "repeats": args.repeats, "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
               "train_environment": saved.get("environment"), "variants": list(rows.values())}
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
