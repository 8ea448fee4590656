"""What each benchmark offers, before any data is read: how many tasks it has, how many labels a task
uses, where its labels live (shared or unshared), the defaults of ``--tasks`` / ``--outputs``, and the
sizes beyond which a run is refused rather than left to hang or exhaust memory.

``run`` and the CLI take their per-benchmark defaults from here, so ``supsup-fast run --benchmark split``
needs no other flag (5 tasks of 2 digits), and the checks of :meth:`ExperimentConfig.validate` and the
defaults cannot disagree.
"""

from __future__ import annotations

from ..errors import SupsupError

#: classes in each image source (the split benchmarks divide them into tasks)
SOURCE_CLASSES = {"mnist5k": 10, "mnist": 10, "cifar100": 100}
#: classes per task of the split benchmarks (SplitMNIST: 2 digits; SplitCIFAR-100: 5 classes)
SPLIT_CLASSES_PER_TASK = {"mnist5k": 2, "mnist": 2, "cifar100": 5}
#: RotatedMNIST's tasks are 10 degrees apart, so it has 36 distinct ones
ROTATED_TASKS = 36
#: the default number of tasks of the open-ended benchmarks (permuted, rotated)
OPEN_ENDED_DEFAULT_TASKS = 20
#: superfluous output neurons beyond the real labels when --outputs is not given (the paper uses 100+ in all)
DEFAULT_OUTPUTS = 100

# Sizes past these are refused at once: each grows memory or time linearly, and a value past them is a
# typo (``--batch-size 100000000``), not an experiment.
MAX_TASKS = 100_000        # a LeNet bank of 100,000 tasks is 3.4 GiB of mask bits
MAX_OUTPUTS = 100_000      # every layer's mask grows with the output layer
MAX_THREADS = 1024


def max_tasks(benchmark: str, data: str):
    """How many distinct tasks ``benchmark`` has on ``data`` (``None``: as many as asked, up to MAX_TASKS)."""
    if benchmark == "split":
        return SOURCE_CLASSES[data] // SPLIT_CLASSES_PER_TASK[data]
    if benchmark == "rotated":
        return ROTATED_TASKS
    return None


def default_tasks(benchmark: str, data: str) -> int:
    """``--tasks`` when not given: every task of a split benchmark, 20 of the others."""
    limit = max_tasks(benchmark, data)
    return OPEN_ENDED_DEFAULT_TASKS if limit is None else min(limit, OPEN_ENDED_DEFAULT_TASKS)


def labels_shared(benchmark: str, scenario: str) -> bool:
    """Whether tasks share their output labels. The split benchmarks under GNu keep each task's classes on
    output neurons of their own (the paper's l*k outputs); permuted and rotated tasks are the same 10 digits."""
    return not (benchmark == "split" and scenario == "GNu")


def real_classes(benchmark: str, data: str, scenario: str) -> int:
    """Output neurons that carry labels: the classes of one task, or of all tasks when labels are unshared."""
    if benchmark != "split":
        return SOURCE_CLASSES[data]
    return SPLIT_CLASSES_PER_TASK[data] if labels_shared(benchmark, scenario) else SOURCE_CLASSES[data]


def default_outputs(benchmark: str, data: str, scenario: str) -> int:
    """``--outputs`` when not given: 100, or the real labels plus 100 superfluous neurons when they are 100 or more."""
    real = real_classes(benchmark, data, scenario)
    return DEFAULT_OUTPUTS if real < DEFAULT_OUTPUTS else real + DEFAULT_OUTPUTS


def check_sizes(cfg) -> None:
    """Refuse sizes no run could use before anything is built (upper bounds; validate checks the lower ones)."""
    limit = max_tasks(cfg.benchmark, cfg.data)
    if limit is not None and cfg.tasks > limit:
        raise SupsupError(f"--benchmark {cfg.benchmark} has {limit} tasks on --data {cfg.data}; "
                          f"got --tasks {cfg.tasks}")
    if cfg.tasks > MAX_TASKS:
        raise SupsupError(f"--tasks {cfg.tasks} is more than {MAX_TASKS:,} "
                          "(the bank and task inference grow with every task)")
    if cfg.outputs > MAX_OUTPUTS:
        raise SupsupError(f"--outputs {cfg.outputs} is more than {MAX_OUTPUTS:,} output neurons")


def check_batch_sizes(cfg, bench) -> None:
    """``--batch-size`` against the data: a training batch draws each image at most once, so it cannot exceed the
    smallest task's training split (asking for 10^8 images of a 4000-image task would only loop and allocate)."""
    smallest = min(bench.split_size(t, "train") for t in range(bench.num_tasks))
    if cfg.batch_size > smallest:
        raise SupsupError(f"--batch-size {cfg.batch_size} is larger than the {smallest} training images of the "
                          f"smallest task of --benchmark {cfg.benchmark} on --data {cfg.data}")


def check_threads(threads) -> None:
    if threads is not None and threads > MAX_THREADS:
        raise SupsupError(f"--threads {threads} is more than {MAX_THREADS}")


__all__ = ["max_tasks", "default_tasks", "labels_shared", "real_classes", "default_outputs", "check_sizes",
           "check_batch_sizes", "check_threads", "MAX_TASKS", "MAX_OUTPUTS", "MAX_THREADS"]
