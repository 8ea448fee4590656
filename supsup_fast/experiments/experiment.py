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

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import convert, inference, training
from ..config import SupsupConfig, check_seed
from ..errors import SupsupError
from ..seed_format import DEFAULT_SEED_FORMAT, SEED_FORMAT_VERSIONS
from . import benchmark_spec, data, metrics, models, run_dir
from .hopsupsup import hopsupsup_table, run_hopsupsup  # noqa: F401  (HopSupSup's runner, importable from here as before)

SCENARIOS = ("GG", "GNs", "GNu", "NNs")
BENCHMARKS = ("permuted", "rotated", "split")
SOURCES = ("mnist5k", "mnist", "cifar100")
#: The task-inference objective when none is given: G (with superfluous neurons) for the GN
#: scenarios; entropy for NNs, whose novelty test needs it (see ExperimentConfig.validate).
DEFAULT_OBJECTIVE = {"GG": "g", "GNs": "g", "GNu": "g", "NNs": "entropy"}
NNS_NEEDS_ENTROPY = (
    "--scenario NNs needs --objective entropy: its novelty test allocates a mask when the belief "
    "softmax(-d obj/d alpha) is close to uniform, but the G objective's alpha-gradient favours any trained mask "
    "over the untrained slots even on data no mask was trained on, so no mask would be allocated after the first")


@dataclass
class ExperimentConfig:
    """Every knob of :func:`run` (the CLI flags map one to one)."""

    benchmark: str = "permuted"
    data: str = "mnist5k"
    data_root: Optional[str] = None
    arch: str = "lenet"
    outputs: Optional[int] = None  # None: benchmark_spec.default_outputs
    tasks: Optional[int] = None  # None: benchmark_spec.default_tasks
    iterations: int = 1000
    batch_size: int = 128
    optimizer: str = "rmsprop"
    lr: float = 1e-4
    binariser: str = "threshold"
    density: float = 0.5
    seed_format: int = DEFAULT_SEED_FORMAT  # how the signed-constant base is regenerated (supsup_fast.seed_format)
    scenario: str = "GNu"
    method: str = "shortlist"
    compare_methods: list = field(default_factory=list)
    objective: Optional[str] = None  # None: the scenario's default (DEFAULT_OBJECTIVE)
    batch_mode: str = "per_example"
    rows: Optional[int] = 1
    shortlist: int = 4  # method "shortlist": the most candidates scored by their own networks on all rows
    shortlist_by: str = "auto"  # method "shortlist": how they are chosen (inference.SHORTLIST_BY)
    shortlist_rows: int = 16  # method "shortlist", shortlist_by "rows": rows the first scoring uses
    shortlist_score: str = "auto"  # method "shortlist": what the own outputs are compared by (inference.SHORTLIST_SCORES)
    eval_images: int = 100
    test_batch_size: int = 128
    eval_seed: int = 0
    checkpoints: list = field(default_factory=list)
    device: str = "cpu"
    seed: int = 0
    out_dir: str = "supsup_runs/latest"
    progress: bool = True
    save_bank: bool = True
    check_every: int = 100  # NNs: batches between novelty checks
    preset: Optional[str] = None  # the --preset these values came from (recorded; see supsup_fast.experiments.presets)

    def validate(self) -> None:
        """Reject impossible combinations with a message that says which flags clash."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SupsupError(msg)

        need(self.benchmark in BENCHMARKS, f"--benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        need(self.data in SOURCES, f"--data must be one of {SOURCES}, got {self.data!r}")
        need(self.arch in models.ARCHITECTURES, f"--arch must be one of {sorted(models.ARCHITECTURES)}")
        need(self.scenario in SCENARIOS, f"--scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.objective is None:
            self.objective = DEFAULT_OBJECTIVE[self.scenario]
        if self.tasks is None:
            self.tasks = benchmark_spec.default_tasks(self.benchmark, self.data)
        if self.outputs is None:
            self.outputs = benchmark_spec.default_outputs(self.benchmark, self.data, self.scenario)
        for m in [self.method, *self.compare_methods]:
            need(m in inference.METHODS, f"--method must be one of {inference.METHODS}, got {m!r}")
        need(not self.compare_methods or self.scenario in ("GNs", "GNu"),
             f"--compare-methods needs a task-inference --scenario (GNs or GNu), not --scenario {self.scenario}")
        need(self.objective in inference.OBJECTIVES, f"--objective must be one of {inference.OBJECTIVES}")
        for name in ("shortlist", "shortlist_rows"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        need(self.shortlist_by in inference.SHORTLIST_BY,
             f"--shortlist-by must be one of {inference.SHORTLIST_BY}, got {self.shortlist_by!r}")
        need(self.shortlist_score in inference.SHORTLIST_SCORES,
             f"--shortlist-score must be one of {inference.SHORTLIST_SCORES}, got {self.shortlist_score!r}")
        need(self.batch_mode in inference.BATCH_MODES, f"--batch-mode must be one of {inference.BATCH_MODES}")
        need(self.rows is None or (isinstance(self.rows, int) and self.rows >= 1),
             f"--rows must be a positive integer or 'all', got {self.rows!r}")
        for name in ("tasks", "iterations", "batch_size", "eval_images", "test_batch_size", "outputs", "check_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        benchmark_spec.check_sizes(self)
        check_seed(self.seed, "--seed")
        need(0.0 < self.lr < 10.0, f"--lr must be in (0, 10), got {self.lr}")
        need(0.0 < self.density <= 1.0, f"--density is the fraction of weights kept, in (0, 1]; got {self.density}")
        need(self.seed_format in SEED_FORMAT_VERSIONS and not isinstance(self.seed_format, bool),
             f"--seed-format must be one of {SEED_FORMAT_VERSIONS}, got {self.seed_format!r}")
        if self.data == "cifar100":
            need(self.benchmark == "split", "--data cifar100 only supports --benchmark split (SplitCIFAR100)")
        if self.data in ("mnist", "cifar100"):
            need(self.data_root is not None, f"--data {self.data} needs --data-root (the files are never downloaded)")
        if self.arch == "resnet18":
            need(self.data == "cifar100" or self.benchmark != "permuted",
                 "--arch resnet18 needs images; --benchmark permuted destroys the spatial structure it relies on")
        classes = benchmark_spec.real_classes(self.benchmark, self.data, self.scenario)
        need(self.outputs >= classes, f"--outputs {self.outputs} is fewer than the {classes} labelled outputs of "
                                      f"--benchmark {self.benchmark} under --scenario {self.scenario}")
        if self.objective == "g" and self.scenario != "GG":
            need(self.outputs > classes, f"--objective g needs superfluous outputs: --outputs must exceed the "
                                         f"{classes} real classes (the paper uses 100+)")
        if self.scenario in ("GNs", "GNu", "NNs"):
            need(self.binariser == "threshold" or self.density < 1.0,
                 f"--scenario {self.scenario} infers tasks, which needs masks that differ: --binariser topk with "
                 "--density 1 keeps every weight in every task")
        if self.scenario == "NNs":
            need(self.objective == "entropy", NNS_NEEDS_ENTROPY)
            need(self.iterations >= self.check_every,
                 f"--scenario NNs checks for novelty every --check-every={self.check_every} batches; with "
                 f"--iterations {self.iterations} per task some tasks would pass without a check and train "
                 f"another task's mask: give --iterations >= --check-every")
        if self.device.startswith("cuda"):
            need(torch.cuda.is_available(), f"--device {self.device} asked for, but torch sees no CUDA device")
        else:
            need(self.device == "cpu", f"--device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        from .presets import PRESETS

        need(self.preset is None or self.preset in PRESETS, f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
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
    split = data.SplitCIFAR100 if cfg.data == "cifar100" else data.SplitMNIST
    return split(src, num_tasks=cfg.tasks, remap_labels=benchmark_spec.labels_shared(cfg.benchmark, cfg.scenario),
                 flatten=flatten, device=cfg.device)


def default_checkpoints(tasks: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``tasks``, and ``tasks`` itself."""
    points, base = [], 1
    while base <= tasks:
        points += [p for p in (base, 2 * base, 5 * base) if p <= tasks]
        base *= 10
    return sorted(set(points + [tasks]))


def _infer_kwargs(cfg: ExperimentConfig, num_real: int, method: Optional[str] = None) -> dict:
    return dict(method=method or cfg.method, objective=cfg.objective, num_real=num_real if cfg.objective == "g" else None,
                batch_mode=cfg.batch_mode, rows=cfg.rows, shortlist=cfg.shortlist, shortlist_by=cfg.shortlist_by,
                shortlist_rows=cfg.shortlist_rows, shortlist_score=cfg.shortlist_score)


def eval_indices(size: int, count: int) -> torch.Tensor:
    """``min(count, size)`` test indices evenly spaced over a split of ``size`` images: a split may
    be sorted by class, and its first ``count`` images would then all be one digit."""
    n = min(count, size)
    return torch.arange(n) * size // n


#: Tag mixed into the seed of the evaluation order (keeps it apart from the training streams' seeds).
EVAL_ORDER_TAG = 2


def eval_batches(size: int, count: int, batch_size: int, task: int, seed: int = 0) -> list[torch.Tensor]:
    """The test positions one task is evaluated on, as batches of at most ``batch_size``.

    The images are :func:`eval_indices` (class-balanced even on a split sorted by class) in an
    order shuffled by ``torch.randperm`` from a generator seeded with ``(seed, task,
    EVAL_ORDER_TAG)``, so every batch is class-mixed like the paper's shuffled test loaders
    (consecutive chunks of a sorted split would hold one or two digits each). Per-example
    results cannot depend on this order; batch-mode results do, and the seed is recorded.
    """
    picked = eval_indices(size, count)
    gen = torch.Generator().manual_seed(data._mix_seed(seed, task, EVAL_ORDER_TAG))
    picked = picked[torch.randperm(picked.numel(), generator=gen)]
    return list(picked.split(batch_size))


def eval_protocol(cfg: ExperimentConfig) -> dict:
    """How the evaluated test batches are formed, for a results file."""
    return {"images_per_task": cfg.eval_images, "batch_size": cfg.test_batch_size, "eval_seed": cfg.eval_seed,
            "picks": "min(eval_images, split) test images evenly spaced over the task's test split",
            "order": "torch.randperm(picks) from torch.Generator seeded with numpy SeedSequence([eval_seed, task, "
                     f"{EVAL_ORDER_TAG}]); consecutive batches of batch_size from that order (the last may be short)",
            "batch_mode": cfg.batch_mode, "rows": "all" if cfg.rows is None else cfg.rows}


def measure_task_inference(model, bench, cfg: ExperimentConfig, tasks: int, progress: bool,
                           method: Optional[str] = None, mask_of_task: Optional[list] = None) -> dict:
    """GN accuracy, task-inference accuracy and confusion over the first ``tasks`` tasks.

    ``task_inference_accuracy`` counts images; ``inference_accuracy`` counts inferences (test
    batches in batch mode, images per example); ``min_classes_per_batch`` is the fewest distinct
    classes any evaluated batch held. ``mask_of_task[t]`` is the mask that is right for task
    ``t``'s images (NNs; default: mask ``t``); the confusion is then tasks x masks."""
    num_real = bench.num_classes
    kwargs = _infer_kwargs(cfg, num_real, method)
    right = list(range(tasks)) if mask_of_task is None else [int(m) for m in mask_of_task]
    masks = max(tasks, convert.num_tasks(model))
    confusion = torch.zeros(tasks, masks, dtype=torch.int64)
    correct = gg_correct = count = 0
    seconds = 0.0
    inferences = inferences_right = 0
    min_classes = None
    per_task = torch.zeros(3, tasks, dtype=torch.int64)  # right (scenario), right (GG, same images), images
    for t in tqdm(range(tasks), desc=f"task inference ({tasks} tasks)", leave=False, disable=not progress):
        for positions in eval_batches(bench.split_size(t, "test"), cfg.eval_images, cfg.test_batch_size, t,
                                      cfg.eval_seed):
            x, y = bench.batch(t, "test", positions)
            classes_here = int(torch.unique(y).numel())
            min_classes = classes_here if min_classes is None else min(min_classes, classes_here)
            t0 = time.perf_counter()
            ids, classes = inference.predict(model, x, **kwargs)
            seconds += time.perf_counter() - t0
            if cfg.batch_mode == "per_example":
                inferences += x.shape[0]
                inferences_right += int((ids == right[t]).sum())
            else:
                inferences += 1
                inferences_right += int(ids[0] == right[t])
            hit = (inference.gnu_correct(ids, classes, right[t], y) if cfg.scenario in ("GNu", "NNs")
                   else inference.gns_correct(classes, y))
            given = torch.full((x.shape[0],), right[t], dtype=torch.int64, device=x.device)
            gg_hit = int(inference.gns_correct(inference.classify(model, x, given), y).sum())
            per_task[:, t] += torch.tensor([int(hit.sum()), gg_hit, x.shape[0]])
            correct += int(hit.sum())
            gg_correct += gg_hit
            count += x.shape[0]
            claimed = ids.cpu()[ids.cpu() >= 0]  # inference.NO_TASK (a non-finite input) claims no task
            confusion[t] += torch.bincount(claimed, minlength=masks)
    task_acc = float(sum(int(confusion[t, right[t]]) for t in range(tasks))) / max(count, 1)
    return {"tasks": tasks, "method": kwargs["method"], "accuracy": correct / max(count, 1), "task_inference_accuracy": task_acc,
            "gg_accuracy_same_images": gg_correct / max(count, 1),
            "images": count, "inferences": inferences, "inference_accuracy": inferences_right / max(inferences, 1),
            "min_classes_per_batch": min_classes, "seconds": seconds,
            "ms_per_inference": 1e3 * seconds / max(inferences, 1), "confusion": confusion.tolist(),
            "per_task_accuracy": (per_task[0].double() / per_task[2].clamp(min=1)).tolist(),
            "per_task_gg_accuracy_same_images": (per_task[1].double() / per_task[2].clamp(min=1)).tolist()}


def _gg_accuracy(model, bench, t: int, batch_size: int) -> float:
    return training.evaluate(model, bench.test_loader(t, batch_size), task=t)["accuracy"]


@torch.no_grad()
def gg_eval_accuracy(model, bench, cfg: ExperimentConfig, t: int) -> float:
    """Task ``t``'s accuracy with its own mask on its evaluated test images (the images GN is measured on)."""
    right = count = 0
    for positions in eval_batches(bench.split_size(t, "test"), cfg.eval_images, cfg.test_batch_size, t, cfg.eval_seed):
        x, y = bench.batch(t, "test", positions)
        given = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        right += int(inference.gns_correct(inference.classify(model, x, given), y).sum())
        count += x.shape[0]
    return right / max(count, 1)


#: Points of a task's recorded loss curve (means over equal windows of its training batches).
LOSS_CURVE_POINTS = 50


def loss_curve(losses: list) -> dict:
    """A task's training loss as means over windows of ``ceil(len / LOSS_CURVE_POINTS)`` batches."""
    window = max(1, -(-len(losses) // LOSS_CURVE_POINTS))
    means = [sum(losses[i:i + window]) / len(losses[i:i + window]) for i in range(0, len(losses), window)]
    return {"batches_per_point": window, "mean_loss": means}


def _accuracy_matrix(results: dict) -> dict:
    """``results['accuracy_matrix']`` with the metrics of each of its kinds (see :mod:`.metrics`)."""
    m = results["accuracy_matrix"]
    for kind in ("gg", "gn"):
        rows = {int(n): r for n, r in m[kind].items()}
        m[f"{kind}_metrics"] = metrics.summarise(rows, m["gg_diagonal"] if kind == "gg" else None)
    return m


def _train_labelled(model, bench, cfg, results, progress):
    """GG / GNs / GNu: one mask per task, task identity given at training time."""
    checkpoints = set(cfg.checkpoints or default_checkpoints(cfg.tasks))
    rows = set(metrics.matrix_rows(cfg.tasks, checkpoints))
    matrix = results.setdefault("accuracy_matrix", {"rows_after_tasks": sorted(rows), "images": "evaluated test images",
                                                    "gg": {}, "gn": {}, "gg_diagonal": []})
    for t in tqdm(range(len(results["per_task"]), cfg.tasks), desc="tasks", disable=not progress):
        stats = training.fit_task(model, bench.infinite_batches(t, cfg.batch_size, seed=cfg.seed),
                                  iterations=cfg.iterations, optimizer=cfg.optimizer, lr=cfg.lr,
                                  progress=progress, desc=f"task {t}")
        results["train_seconds"] += stats["seconds"]
        results["per_task"].append({"task": t, "gg_accuracy": _gg_accuracy(model, bench, t, cfg.test_batch_size),
                                    "final_train_loss": float(sum(stats["losses"][-50:]) / len(stats["losses"][-50:])),
                                    "train_seconds": stats["seconds"], "loss_curve": loss_curve(stats["losses"])})
        gn = None
        if cfg.scenario != "GG" and (t + 1) in checkpoints:
            gn = measure_task_inference(model, bench, cfg, t + 1, progress)
            results["vs_tasks"].append(gn)
            matrix["gn"][str(t + 1)] = gn["per_task_accuracy"]
        if t + 1 in rows:
            matrix["gg"][str(t + 1)] = (gn["per_task_gg_accuracy_same_images"] if gn is not None
                                   else [gg_eval_accuracy(model, bench, cfg, j) for j in range(t + 1)])
            matrix["gg_diagonal"].append(matrix["gg"][str(t + 1)][t])
        else:
            matrix["gg_diagonal"].append(gg_eval_accuracy(model, bench, cfg, t))
        # every finished task is on disk (bank and results) before the next begins: a run resumes from here
        run_dir.commit_task(model, cfg.out_dir, results, save_bank=cfg.save_bank)


def _train_nns(model, bench, cfg, results, progress):
    """NNs: the stream carries no task identity; masks are allocated by the novelty test."""
    from .experiment_nns import train_nns

    train_nns(model, bench, cfg, results, progress, checkpoints=set(cfg.checkpoints or default_checkpoints(cfg.tasks)),
              measure=lambda m, tasks, mask_of_task: measure_task_inference(m, bench, cfg, tasks, progress,
                                                                             mask_of_task=mask_of_task))


def run(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the experiment described by ``cfg``; returns (and writes) the results.

    ``cfg.out_dir`` must not hold another run (``overwrite=True`` removes its files first); ``resume=True``
    continues the interrupted run there (``cfg`` from :func:`run_dir.resume`) at its next task.
    """
    cfg.validate()
    if not resume:
        run_dir.claim(cfg.out_dir, overwrite=overwrite)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    progress = cfg.progress
    bench = build_benchmark(cfg)
    benchmark_spec.check_batch_sizes(cfg, bench)
    model = models.build(cfg.arch, cfg.outputs, bench.input_shape)
    sup = SupsupConfig(binariser=cfg.binariser, density=cfg.density, seed=cfg.seed, seed_format=cfg.seed_format)
    convert.convert_(model, sup)
    model.to(cfg.device)
    results = {"config": asdict(cfg), "protocol": eval_protocol(cfg), "data": bench.describe(),
               "environment": _environment(),
               "per_task": [], "vs_tasks": [], "train_seconds": 0.0}
    if resume:
        saved = run_dir.restore(model, cfg.out_dir)
        results.update({k: saved[k] for k in ("per_task", "vs_tasks", "train_seconds", "accuracy_matrix")
                        if k in saved})
    else:
        run_dir.write_json(os.path.join(cfg.out_dir, "results.json"), {**results, "complete": False})
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
    if "accuracy_matrix" in results:
        _accuracy_matrix(results)
    results["peak_memory"] = _peak_memory(cfg.device)
    results["total_seconds"] = time.perf_counter() - t_start
    results.pop("resume", None)
    results["complete"] = True
    if cfg.save_bank:
        from ..checkpoint import save_bank

        bank_path = os.path.join(cfg.out_dir, "bank")
        save_bank(model, bank_path, metadata={"experiment": asdict(cfg)})
        results["bank_path"] = bank_path
    run_dir.write_json(os.path.join(cfg.out_dir, "results.json"), results)
    results["plot_path"] = plot(results, os.path.join(cfg.out_dir, "accuracy_vs_tasks.png"))
    if "accuracy_matrix" in results:
        c = results["config"]
        results["matrix_plot_path"] = metrics.plot_accuracy_matrix(
            results["accuracy_matrix"], os.path.join(cfg.out_dir, "accuracy_matrix.png"),
            title=f"{c['benchmark']} {c['data']}, {c['arch']}, {c['tasks']} tasks")
    return results


def _peak_memory(device: str) -> dict:
    """Peak resident memory of this process (and of the CUDA allocator on a GPU run)."""
    import resource

    got = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if str(device).startswith("cuda") and torch.cuda.is_available():
        got["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return got


def _environment() -> dict:
    from .. import __version__
    from ..info import collect, cpu_model

    info = collect()
    return {"supsup_fast": __version__, "cpu_model": cpu_model(),
            **{k: info[k] for k in ("python", "torch", "triton", "device", "threads", "extension_loaded")}}



def _log_tick_labels(xs: list) -> list:
    """Labels for ticks at every checkpoint of a log axis: a checkpoint less than 1.8x the last labelled
    one stays unlabelled (300, 400, ..., 1000 would print over each other); the last is always labelled."""
    shown, last = [False] * len(xs), None
    for i, x in enumerate(xs):
        if last is None or x >= 1.8 * last:
            shown[i], last = True, x
    if not shown[-1]:
        prev = max(i for i in range(len(xs) - 1) if shown[i])
        if xs[-1] < 1.8 * xs[prev] and prev > 0:
            shown[prev] = False
        shown[-1] = True
    return [str(x) if keep else "" for x, keep in zip(xs, shown)]


def plot(results: dict, path: str) -> Optional[str]:
    """Accuracy and task-inference accuracy vs number of tasks, with GG accuracy on the same images.

    GG runs (no inference) show each task's GG accuracy. Ticks are whole numbers of tasks; the
    accuracy axis spans at least 10 points, so noise of a fraction of a point does not look like
    forgetting."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    pts = [p for p in results["vs_tasks"] if "accuracy" in p]
    shown = []
    if pts:
        xs = [p["tasks"] for p in pts]
        acc = [100 * p["accuracy"] for p in pts]
        ax.plot(xs, acc, "o-", label=f"{results['config']['scenario']} accuracy")
        shown += acc
        if all("gg_accuracy_same_images" in p for p in pts):
            gg = [100 * p["gg_accuracy_same_images"] for p in pts]
            ax.plot(xs, gg, ":", marker=".", color="gray", label="GG accuracy, same images")
            shown += gg
        ti = [100 * p["task_inference_accuracy"] for p in pts]
        ax.plot(xs, ti, "s--", label="task-inference accuracy")
        shown += ti
        ax.set_xlabel("number of tasks learned")
    elif results["per_task"]:
        gg = [100 * p["gg_accuracy"] for p in results["per_task"]]
        xs = list(range(1, len(gg) + 1))
        ax.plot(xs, gg, "o-", color="gray", label="GG accuracy of task n (after learning it)")
        shown += gg
        ax.set_xlabel("task n")
    else:
        xs = []
    ax.set_ylabel("accuracy (%)")
    if shown:
        low = max(0.0, min(min(shown) - 2.0, 90.0))
        ax.set_ylim(math.floor(low / 5) * 5, 100.5)
    if xs and max(xs) >= 20:
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(_log_tick_labels(xs))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
        n = results["nns"]
        lines.append(f"NNs: {n['masks_allocated']} masks allocated for {c['tasks']} tasks "
                     f"({'one per task, in order' if n['one_mask_per_task'] else 'masks of the tasks: ' + str(n['mask_of_task'])}; "
                     f"{n['checks']} novelty checks: {n['decisions']['new']} new, {n['decisions']['switch']} switch, "
                     f"{n['decisions']['continue']} continue)")
    for kind in ("gg", "gn"):
        cl = (results.get("accuracy_matrix") or {}).get(f"{kind}_metrics")
        if cl:
            lines.append(f"{kind.upper()} continual-learning metrics over {cl['rows_measured']} measured rows of R: "
                         f"average accuracy {100 * cl['average_accuracy']:.2f}%, backward transfer "
                         f"{100 * cl['backward_transfer']:+.2f} points, mean forgetting {100 * cl['mean_forgetting']:.2f} "
                         f"points (max {100 * cl['max_forgetting']:.2f})")
    m = results["memory"]
    lines.append("")
    lines.append(f"mask bits: {m['mask_bytes_per_task'] / 1024:.1f} KiB per task, {m['mask_bytes_total'] / 2**20:.2f} MiB "
                 f"in all (a float32 mask stack would take {m['float32_stack_bytes_equivalent'] / 2**20:.1f} MiB)")
    lines.append(f"time: {results['train_seconds']:.1f} s training, {results['total_seconds']:.1f} s in all")
    return "\n".join(lines)


__all__ = ["ExperimentConfig", "run", "summary_table", "default_checkpoints", "eval_indices", "measure_task_inference", "plot",
           "SCENARIOS", "BENCHMARKS", "SOURCES"]
