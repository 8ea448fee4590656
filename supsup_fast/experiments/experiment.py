"""A whole continual-learning experiment: train a sequence of task masks, then measure SupSup.

:func:`run` is what ``supsup-fast run`` executes. It trains one supermask per task (or, in the
NNs scenario, lets :class:`~supsup_fast.nns.NNsTrainer` allocate masks with no task identity),
then measures:

* GG: each task's accuracy with its own mask (task given);
* GN (GNs / GNu): task inference without the task id on ``eval_images`` test images per task,
  each image inferred on its own (``batch_mode="per_example"``: every row gets its own task,
  exactly as if inferred from that single image) or, with ``batch_mode="batch"``, one inference
  per test batch from its first ``rows`` images (the paper's protocol); the prediction then uses
  the inferred task's mask. GNu counts a prediction only when task *and* class are right;
  GNs only the class. Also the task-inference accuracy and its confusion matrix;
* GN accuracy *versus the number of tasks*: the same measurement repeated right after the
  tasks at ``checkpoints`` were learned, over the tasks known at that point;
* bytes of mask bits per task and in all, and the time spent.

Outputs in ``out_dir``: ``results.json``, ``accuracy_vs_tasks.png`` and the mask bank
(:func:`supsup_fast.checkpoint.save_bank`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import convert, inference, training
from ..config import SupsupConfig
from ..errors import SupsupError
from . import data, models

SCENARIOS = ("GG", "GNs", "GNu", "NNs")
BENCHMARKS = ("permuted", "rotated", "split")
SOURCES = ("mnist5k", "mnist", "cifar100")


@dataclass
class ExperimentConfig:
    """Every knob of :func:`run` (the CLI flags map one to one)."""

    benchmark: str = "permuted"
    data: str = "mnist5k"
    data_root: Optional[str] = None
    arch: str = "lenet"
    outputs: int = 100
    tasks: int = 20
    iterations: int = 1000
    batch_size: int = 128
    optimizer: str = "rmsprop"
    lr: float = 1e-4
    binariser: str = "threshold"
    density: float = 0.5
    scenario: str = "GNu"
    method: str = "one_shot"
    compare_methods: list = field(default_factory=list)
    objective: str = "g"
    batch_mode: str = "per_example"
    rows: Optional[int] = 1
    eval_images: int = 100
    test_batch_size: int = 128
    checkpoints: list = field(default_factory=list)
    device: str = "cpu"
    seed: int = 0
    out_dir: str = "supsup_runs/latest"
    progress: bool = True
    save_bank: bool = True

    def validate(self) -> None:
        """Reject impossible combinations with a message that says which flags clash."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SupsupError(msg)

        need(self.benchmark in BENCHMARKS, f"--benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        need(self.data in SOURCES, f"--data must be one of {SOURCES}, got {self.data!r}")
        need(self.arch in models.ARCHITECTURES, f"--arch must be one of {sorted(models.ARCHITECTURES)}")
        need(self.scenario in SCENARIOS, f"--scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        for m in [self.method, *self.compare_methods]:
            need(m in inference.METHODS, f"--method must be one of {inference.METHODS}, got {m!r}")
        need(not self.compare_methods or self.scenario in ("GNs", "GNu"),
             "--compare-methods needs a task-inference scenario (GNs or GNu)")
        need(self.objective in inference.OBJECTIVES, f"--objective must be one of {inference.OBJECTIVES}")
        need(self.batch_mode in inference.BATCH_MODES, f"--batch-mode must be one of {inference.BATCH_MODES}")
        need(self.rows is None or (isinstance(self.rows, int) and self.rows >= 1),
             f"--rows must be a positive integer or 'all', got {self.rows!r}")
        for name in ("tasks", "iterations", "batch_size", "eval_images", "test_batch_size", "outputs"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        need(0.0 < self.lr < 10.0, f"--lr must be in (0, 10), got {self.lr}")
        need(0.0 < self.density <= 1.0, f"--density is the fraction of weights kept, in (0, 1]; got {self.density}")
        if self.data == "cifar100":
            need(self.benchmark == "split", "--data cifar100 only supports --benchmark split (SplitCIFAR100)")
        if self.data in ("mnist", "cifar100"):
            need(self.data_root is not None, f"--data {self.data} needs --data-root (the files are never downloaded)")
        if self.benchmark == "split":
            limit = 20 if self.data == "cifar100" else 5
            need(self.tasks <= limit, f"--benchmark split has {limit} tasks on {self.data}; got --tasks {self.tasks}")
        if self.benchmark == "rotated":
            need(self.tasks <= 36, f"--benchmark rotated has at most 36 distinct tasks (10 degrees apart); "
                                   f"got --tasks {self.tasks}")
        if self.arch == "resnet18":
            need(self.data == "cifar100" or self.benchmark != "permuted",
                 "--arch resnet18 needs images; PermutedMNIST destroys the spatial structure it relies on")
        classes = 5 if (self.benchmark == "split" and self.data == "cifar100") else (2 if self.benchmark == "split" else 10)
        need(self.outputs >= classes, f"--outputs {self.outputs} is fewer than the {classes} classes per task")
        if self.objective == "g" and self.scenario != "GG":
            need(self.outputs > classes, f"--objective g needs superfluous outputs: --outputs must exceed the "
                                         f"{classes} real classes (the paper uses 100+)")
        if self.scenario in ("GNs", "GNu", "NNs"):
            need(self.binariser == "threshold" or self.density < 1.0,
                 "task inference needs masks that differ: --density 1 keeps every weight in every task")
        if self.device.startswith("cuda"):
            need(torch.cuda.is_available(), f"--device {self.device} asked for, but torch sees no CUDA device")
        else:
            need(self.device == "cpu", f"--device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        bad = [c for c in self.checkpoints if not (isinstance(c, int) and 1 <= c <= self.tasks)]
        need(not bad, f"--checkpoints must lie in [1, --tasks={self.tasks}], got {bad}")


def _source(cfg: ExperimentConfig) -> data.Source:
    if cfg.data == "mnist5k":
        return data.mnist_5k()
    if cfg.data == "mnist":
        return data.mnist(cfg.data_root)
    return data.cifar100(cfg.data_root)


def build_benchmark(cfg: ExperimentConfig) -> data.Benchmark:
    src = _source(cfg)
    flatten = cfg.arch != "resnet18"
    if cfg.benchmark == "permuted":
        return data.PermutedMNIST(src, cfg.tasks, flatten=flatten, device=cfg.device)
    if cfg.benchmark == "rotated":
        return data.RotatedMNIST(src, cfg.tasks, flatten=flatten, device=cfg.device)
    if cfg.data == "cifar100":
        return data.SplitCIFAR100(src, num_tasks=cfg.tasks, flatten=flatten, device=cfg.device)
    return data.SplitMNIST(src, num_tasks=cfg.tasks, flatten=flatten, device=cfg.device)


def default_checkpoints(tasks: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``tasks``, and ``tasks`` itself."""
    points, base = [], 1
    while base <= tasks:
        points += [p for p in (base, 2 * base, 5 * base) if p <= tasks]
        base *= 10
    return sorted(set(points + [tasks]))


def _infer_kwargs(cfg: ExperimentConfig, num_real: int, method: Optional[str] = None) -> dict:
    return dict(method=method or cfg.method, objective=cfg.objective, num_real=num_real if cfg.objective == "g" else None,
                batch_mode=cfg.batch_mode, rows=cfg.rows)


def eval_indices(size: int, count: int) -> torch.Tensor:
    """``min(count, size)`` test indices evenly spaced over a split of ``size`` images: a split may
    be sorted by class, and its first ``count`` images would then all be one digit."""
    n = min(count, size)
    return torch.arange(n) * size // n


def measure_task_inference(model, bench, cfg: ExperimentConfig, tasks: int, progress: bool,
                           method: Optional[str] = None) -> dict:
    """GN accuracy, task-inference accuracy and confusion over the first ``tasks`` tasks."""
    num_real = bench.num_classes
    kwargs = _infer_kwargs(cfg, num_real, method)
    confusion = torch.zeros(tasks, tasks, dtype=torch.int64)
    correct = gg_correct = count = 0
    seconds = 0.0
    inferences = 0
    chunk = cfg.test_batch_size
    for t in tqdm(range(tasks), desc=f"task inference ({tasks} tasks)", leave=False, disable=not progress):
        picked = eval_indices(bench.split_size(t, "test"), cfg.eval_images)
        n = picked.numel()
        for start in range(0, n, chunk):
            x, y = bench.batch(t, "test", picked[start:start + chunk])
            t0 = time.perf_counter()
            ids, classes = inference.predict(model, x, **kwargs)
            seconds += time.perf_counter() - t0
            inferences += x.shape[0] if cfg.batch_mode == "per_example" else 1
            hit = (inference.gnu_correct(ids, classes, t, y) if cfg.scenario in ("GNu", "NNs")
                   else inference.gns_correct(classes, y))
            correct += int(hit.sum())
            given = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
            gg_correct += int(inference.gns_correct(inference.classify(model, x, given), y).sum())
            count += x.shape[0]
            confusion[t] += torch.bincount(ids.cpu().clamp_max(tasks - 1), minlength=tasks)
    task_acc = float(confusion.diag().sum()) / max(count, 1)
    return {"tasks": tasks, "method": kwargs["method"], "accuracy": correct / max(count, 1), "task_inference_accuracy": task_acc,
            "gg_accuracy_same_images": gg_correct / max(count, 1),
            "images": count, "inferences": inferences, "seconds": seconds,
            "ms_per_inference": 1e3 * seconds / max(inferences, 1), "confusion": confusion.tolist()}


def _gg_accuracy(model, bench, t: int, batch_size: int) -> float:
    return training.evaluate(model, bench.test_loader(t, batch_size), task=t)["accuracy"]


def _train_labelled(model, bench, cfg, results, progress):
    """GG / GNs / GNu: one mask per task, task identity given at training time."""
    checkpoints = set(cfg.checkpoints or default_checkpoints(cfg.tasks))
    for t in tqdm(range(cfg.tasks), desc="tasks", disable=not progress):
        stats = training.fit_task(model, bench.infinite_batches(t, cfg.batch_size, seed=cfg.seed),
                                  iterations=cfg.iterations, optimizer=cfg.optimizer, lr=cfg.lr,
                                  progress=progress, desc=f"task {t}")
        results["train_seconds"] += stats["seconds"]
        results["per_task"].append({"task": t, "gg_accuracy": _gg_accuracy(model, bench, t, cfg.test_batch_size),
                                    "final_train_loss": float(sum(stats["losses"][-50:]) / len(stats["losses"][-50:])),
                                    "train_seconds": stats["seconds"]})
        if cfg.scenario != "GG" and (t + 1) in checkpoints:
            results["vs_tasks"].append(measure_task_inference(model, bench, cfg, t + 1, progress))
            # long runs: every checkpoint is on disk as soon as it is measured
            _write_json(os.path.join(cfg.out_dir, "results.json"), {**results, "complete": False})


def _train_nns(model, bench, cfg, results, progress):
    """NNs: the stream carries no task identity; masks are allocated by the novelty test."""
    from ..nns import NNsTrainer

    trainer = NNsTrainer(model, cfg.optimizer, lr=cfg.lr, objective=cfg.objective,
                         num_real=bench.num_classes if cfg.objective == "g" else None, budget=max(2500, cfg.tasks),
                         seed=cfg.seed)
    t0 = time.perf_counter()
    for t in tqdm(range(cfg.tasks), desc="tasks (identity hidden)", disable=not progress):
        stream = bench.infinite_batches(t, cfg.batch_size, seed=cfg.seed)
        for _ in tqdm(range(cfg.iterations), desc=f"stream {t}", leave=False, disable=not progress):
            trainer.step(*next(stream))
    trainer.finish()
    results["train_seconds"] += time.perf_counter() - t0
    results["nns"] = {"masks_allocated": trainer.num_frozen, "checks": len(trainer.history),
                      "decisions": [h["decision"] for h in trainer.history]}
    # GG has no meaning without a task -> mask map; report each mask's best task instead.
    results["vs_tasks"].append(measure_task_inference(model, bench, cfg, min(cfg.tasks, trainer.num_frozen), progress)
                               if trainer.num_frozen == cfg.tasks else
                               {"tasks": cfg.tasks, "note": f"{trainer.num_frozen} masks for {cfg.tasks} tasks"})


def run(cfg: ExperimentConfig) -> dict:
    """Run the experiment described by ``cfg``; returns (and writes) the results."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    progress = cfg.progress
    bench = build_benchmark(cfg)
    model = models.build(cfg.arch, cfg.outputs, bench.input_shape)
    sup = SupsupConfig(binariser=cfg.binariser, density=cfg.density, seed=cfg.seed)
    convert.convert_(model, sup)
    model.to(cfg.device)
    results = {"config": asdict(cfg), "data": bench.describe(), "environment": _environment(),
               "per_task": [], "vs_tasks": [], "train_seconds": 0.0}
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.scenario == "NNs":
        _train_nns(model, bench, cfg, results, progress)
    else:
        _train_labelled(model, bench, cfg, results, progress)
    n_tasks = convert.num_tasks(model)
    bits = convert.mask_nbytes(model)
    results["memory"] = {"mask_bytes_total": bits, "mask_bytes_per_task": bits / max(n_tasks, 1),
                         "base_weights_stored": "seed only (signed constant)",
                         "float32_stack_bytes_equivalent": 32 * bits}
    if results["per_task"]:
        results["gg_accuracy_mean"] = sum(p["gg_accuracy"] for p in results["per_task"]) / len(results["per_task"])
    results["final"] = results["vs_tasks"][-1] if results["vs_tasks"] else None
    # the other methods on the same masks, at the final number of tasks
    results["compared_methods"] = [measure_task_inference(model, bench, cfg, n_tasks, progress, method=m)
                                   for m in cfg.compare_methods]
    results["total_seconds"] = time.perf_counter() - t_start
    results["complete"] = True
    if cfg.save_bank:
        from ..checkpoint import save_bank

        bank_path = os.path.join(cfg.out_dir, "bank")
        save_bank(model, bank_path, metadata={"experiment": asdict(cfg)})
        results["bank_path"] = bank_path
    _write_json(os.path.join(cfg.out_dir, "results.json"), results)
    results["plot_path"] = plot(results, os.path.join(cfg.out_dir, "accuracy_vs_tasks.png"))
    return results


def _environment() -> dict:
    from ..info import collect

    info = collect()
    return {k: info[k] for k in ("python", "torch", "triton", "device", "threads", "extension_loaded")}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot(results: dict, path: str) -> Optional[str]:
    """Accuracy and task-inference accuracy vs number of tasks (GG per task as a reference line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    pts = [p for p in results["vs_tasks"] if "accuracy" in p]
    if pts:
        xs = [p["tasks"] for p in pts]
        ax.plot(xs, [100 * p["accuracy"] for p in pts], "o-", label=f"{results['config']['scenario']} accuracy")
        ax.plot(xs, [100 * p["task_inference_accuracy"] for p in pts], "s--", label="task-inference accuracy")
    if results["per_task"]:
        gg = [100 * p["gg_accuracy"] for p in results["per_task"]]
        ax.plot(range(1, len(gg) + 1), gg, ":", color="gray", label="GG accuracy of task n")
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("accuracy (%)")
    if pts and max(p["tasks"] for p in pts) >= 20:
        ax.set_xscale("log")
    c = results["config"]
    ax.set_title(f"{c['benchmark']} {c['data']}, {c['arch']}, {c['method']} / {c['objective']}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_table(results: dict) -> str:
    """The end-of-run table the CLI prints."""
    lines = []
    c = results["config"]
    lines.append(f"{c['benchmark']} on {c['data']}, {c['arch']} ({c['outputs']} outputs), {c['binariser']} masks, "
                 f"scenario {c['scenario']}, {c['method']} / {c['objective']} / {c['batch_mode']}")
    if results["per_task"]:
        accs = [p["gg_accuracy"] for p in results["per_task"]]
        lines.append(f"GG accuracy (task given): mean {100 * sum(accs) / len(accs):.2f}%  "
                     f"min {100 * min(accs):.2f}%  max {100 * max(accs):.2f}%  over {len(accs)} tasks")
    pts = [p for p in results["vs_tasks"] if "accuracy" in p]
    if pts:
        lines.append("")
        lines.append(f"{'tasks':>6} | {c['scenario'] + ' acc':>9} | {'GG acc':>8} | {'task-inf acc':>12} | {'images':>6} "
                     f"| {'ms/inference':>12}")
        lines.append("-" * 69)
        for p in pts:
            gg = p.get("gg_accuracy_same_images")
            gg_txt = f"{100 * gg:>7.2f}%" if gg is not None else f"{'-':>8}"
            lines.append(f"{p['tasks']:>6} | {100 * p['accuracy']:>8.2f}% | {gg_txt} | {100 * p['task_inference_accuracy']:>11.2f}% "
                         f"| {p['images']:>6} | {p['ms_per_inference']:>12.2f}")
        lines.append("(GG acc: the same images classified with their own task's mask)")
    for p in results.get("compared_methods", []):
        lines.append(f"{p['method']:>14}: {c['scenario']} acc {100 * p['accuracy']:.2f}%, task-inf acc "
                     f"{100 * p['task_inference_accuracy']:.2f}% at {p['tasks']} tasks, "
                     f"{p['ms_per_inference']:.2f} ms/inference")
    if "nns" in results:
        lines.append(f"NNs: {results['nns']['masks_allocated']} masks allocated for {c['tasks']} tasks "
                     f"({results['nns']['checks']} novelty checks)")
    m = results["memory"]
    lines.append("")
    lines.append(f"mask bits: {m['mask_bytes_per_task'] / 1024:.1f} KiB per task, {m['mask_bytes_total'] / 2**20:.2f} MiB "
                 f"in all (a float32 mask stack would take {m['float32_stack_bytes_equivalent'] / 2**20:.1f} MiB)")
    lines.append(f"time: {results['train_seconds']:.1f} s training, {results['total_seconds']:.1f} s in all")
    return "\n".join(lines)


__all__ = ["ExperimentConfig", "run", "summary_table", "default_checkpoints", "eval_indices", "measure_task_inference", "plot",
           "SCENARIOS", "BENCHMARKS", "SOURCES"]


def run_hopsupsup(*, hidden=(256, 256), train_steps: int = 300, recover_steps: int = 30, gamma: float = 1.5e-2,
                  rule: str = "storkey", seed: int = 0, out_dir: str = "supsup_runs/hopfield",
                  progress: bool = True) -> dict:
    """HopSupSup on SplitMNIST-5k: unit masks of every task stored in one fixed-size Hopfield network.

    Each task's mask over the ``d = sum(hidden)`` hidden units is trained with the task given, then
    stored (Storkey rule by default) in a ``d x d`` Hopfield network; the exact masks are kept
    beside it. Each task's mask is then recovered from unlabelled test batches alone by gradient
    descent on output entropy then Hopfield energy, and compared with the exact one: Hamming
    distance and accuracy of both masks on the task's test split.
    """
    from .. import hopfield, objectives

    sizes = (784, *[int(h) for h in hidden], 2)
    bench = data.SplitMNIST(data.mnist_5k(), flatten=True)
    model = hopfield.HiddenMaskedMLP(sizes, seed=seed)
    t0 = time.perf_counter()
    masks = [hopfield.train_unit_mask(model, bench.infinite_batches(t, 128, seed=seed), steps=train_steps, lr=0.05,
                                      seed=seed + t)
             for t in tqdm(range(bench.num_tasks), desc="training unit masks", disable=not progress)]
    store = hopfield.HopfieldMaskStore(model.d, rule=rule)
    store.store_all(masks)
    recovered = []
    for t in tqdm(range(bench.num_tasks), desc="recovering masks", disable=not progress):
        batches = bench.infinite_batches(t, 64, seed=seed + 1, split="test")
        recovered.append(hopfield.recover(store, lambda m, b=batches: objectives.entropy(model(next(b)[0], m)),
                                          steps=recover_steps, gamma=gamma))
    report = hopfield.recovery_report(
        masks, recovered, lambda t, m: hopfield.mask_accuracy(model, m, bench.test_loader(t, 500)))
    results = {"hidden": list(hidden), "d": model.d, "rule": rule, "gamma": gamma, "train_steps": train_steps,
               "recover_steps": recover_steps, "seed": seed, "report": report,
               "hopfield_bytes": store.psi.numel() * store.psi.element_size(),
               "exact_bank_bytes": bench.num_tasks * ((model.d + 7) // 8),
               "seconds": time.perf_counter() - t0, "environment": _environment()}
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "hopfield_results.json"), results)
    return results


def hopsupsup_table(results: dict) -> str:
    r = results["report"]
    lines = [f"HopSupSup on SplitMNIST-5k: d = {results['d']} hidden units, {results['rule']} rule, "
             f"gamma {results['gamma']}, {results['recover_steps']} recovery steps",
             f"{'task':>4} | {'hamming':>7} | {'exact-mask acc':>14} | {'recovered acc':>13}", "-" * 48]
    for row in r["tasks"]:
        lines.append(f"{row['task']:>4} | {row['hamming']:>7} | {100 * row['exact_acc']:>13.2f}% | "
                     f"{100 * row['recovered_acc']:>12.2f}%")
    lines.append(f"exact recoveries: {r['exact_recoveries']} of {len(r['tasks'])}; mean Hamming {r['mean_hamming']:.1f}; "
                 f"Hopfield weights {results['hopfield_bytes'] / 2**20:.2f} MiB (fixed), "
                 f"time {results['seconds']:.1f} s")
    return "\n".join(lines)
