"""Small datasets written in the real on-disk formats, so ``--data mnist`` / ``--data cifar100`` run offline.

* MNIST: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (big-endian IDX, as torchvision
  writes them); the train files gzipped, the test files plain, as both appear in the wild.
* CIFAR-100: ``<root>/cifar-100-python/{train,test}``, pickle protocol 2 dicts with the real keys
  (``filenames``, ``batch_label``, ``fine_labels``, ``coarse_labels``, ``data`` uint8 ``[N, 3072]``).

Every class's images carry a class-specific pattern plus noise, so a few training steps beat chance.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest


def _patterned(rng, labels: np.ndarray, pixels: int, classes: int) -> np.ndarray:
    """uint8 images: class ``c`` brightens its own band of pixels, noise elsewhere."""
    imgs = rng.integers(0, 64, (labels.size, pixels), dtype=np.int64)
    band = pixels // classes
    for i, c in enumerate(labels.tolist()):
        imgs[i, c * band:(c + 1) * band] += 160
    return imgs.clip(0, 255).astype(np.uint8)


def write_mnist(root, train_per_class: int = 8, test_per_class: int = 4, seed: int = 0) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, per_class, opener in (("train", train_per_class, gzip.open), ("t10k", test_per_class, open)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        imgs = _patterned(rng, labels, 28 * 28, 10)
        n = labels.size
        suffix = ".gz" if opener is gzip.open else ""
        with opener(raw / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + imgs.tobytes())
        with opener(raw / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())


def write_cifar100(root, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        entry = {
            "filenames": [f"synthetic_{split}_{i}.png".encode() for i in range(fine.size)],
            "batch_label": f"{split} batch 1 of 1".encode(),
            "fine_labels": [int(y) for y in fine],
            "coarse_labels": [int(y) // 5 for y in fine],
            "data": _patterned(rng, fine, 3 * 32 * 32, 100),
        }
        (base / split).write_bytes(pickle.dumps(entry, protocol=2))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A folder holding a small MNIST and a small CIFAR-100 in torchvision's layout."""
    root = tmp_path_factory.mktemp("datasets")
    write_mnist(root)
    write_cifar100(root)
    return root
