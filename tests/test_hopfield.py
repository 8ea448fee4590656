"""HopSupSup: Hopfield storage of unit masks, recall, and gradient-descent recovery."""

import pytest
import torch

from supsup_fast import hopfield as H
from supsup_fast import reference
from supsup_fast.errors import SupsupError

pytestmark = pytest.mark.usefixtures("one_thread")


def _patterns(n, d, seed):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.5


def _flip(masks, fraction, seed):
    return masks ^ (torch.rand(masks.shape, generator=torch.Generator().manual_seed(seed)) < fraction)


def _direct(rule, masks, d):
    """The learning rules written element by element, in float64, straight from their definitions."""
    w = torch.zeros(d, d, dtype=torch.float64)
    for m in masks:
        x = m.double() * 2 - 1
        new = w.clone()
        for i in range(d):
            for j in range(d):
                if rule == "hebbian":
                    new[i, j] = w[i, j] + (x[i] * x[j] - float(i == j)) / d
                elif rule == "simplified":
                    h = w @ x
                    new[i, j] = w[i, j] + (x[i] * x[j] - float(i == j) - x[i] * h[j] - h[i] * x[j]) / d
                elif i != j:  # Storkey 1997: local fields exclude units i and j; diagonal stays 0
                    h_ij = sum(w[i, k] * x[k] for k in range(d) if k not in (i, j))
                    h_ji = sum(w[j, k] * x[k] for k in range(d) if k not in (i, j))
                    new[i, j] = w[i, j] + (x[i] * x[j] - x[i] * h_ji - h_ij * x[j]) / d
        w = new
    return w


@pytest.mark.parametrize("rule", ["storkey", "simplified", "hebbian"])
@pytest.mark.parametrize("d,n", [(5, 3), (9, 6)])
def test_rules_match_their_definitions(rule, d, n):
    masks = _patterns(n, d, seed=d + n)
    store = H.HopfieldMaskStore(d, rule)
    store.store_all(masks.to(torch.uint8) if d == 5 else masks)  # 0/1 ints and bools both accepted
    torch.testing.assert_close(store.psi.double(), _direct(rule, masks, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.psi, store.psi.T)
    assert int(store.num_stored) == n
    torch.testing.assert_close(store.pattern_mean(), (masks.float() * 2 - 1).mean(0))


def test_energy_is_the_quadratic_form_and_stored_patterns_are_low():
    d = 64
    masks = _patterns(4, d, seed=1)
    store = H.HopfieldMaskStore(d)
    store.store_all(masks)
    s = torch.randn(3, d, dtype=torch.float64)
    expected = torch.stack([-0.5 * v @ store.psi.double() @ v for v in s])
    torch.testing.assert_close(store.energy(s).double(), expected, rtol=1e-5, atol=1e-5)
    stored = store.energy(H.to_pattern(masks))
    random = store.energy(H.to_pattern(_patterns(50, d, seed=2)))
    assert stored.max() < random.min()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_below_capacity_patterns_are_fixed_points_and_attract_noisy_probes(mode):
    d, n = 256, 10
    masks = _patterns(n, d, seed=3)
    store = H.HopfieldMaskStore(d)
    store.store_all(masks)
    assert n < store.capacity_hint()
    assert torch.equal(store.recall(masks, steps=1, mode=mode), masks)  # fixed points
    for frac, seed in ((0.1, 4), (0.2, 5)):
        probes = _flip(masks, frac, seed)
        assert (probes != masks).sum(-1).float().mean() > frac * d * 0.7
        out = store.recall(probes, steps=20, mode=mode)
        assert (out != masks).sum(-1).max() <= 1
    single = store.recall(_flip(masks[3], 0.15, 6), mode=mode)
    assert single.shape == (d,) and torch.equal(single, masks[3])


def test_async_recall_never_raises_energy():
    d = 128
    store = H.HopfieldMaskStore(d)
    store.store_all(_patterns(30, d, seed=7))
    probe = _patterns(1, d, seed=8)[0]
    energies = [float(store.energy(H.to_pattern(probe)))]
    for _ in range(5):
        probe = store.recall(probe, steps=1, mode="async")
        energies.append(float(store.energy(H.to_pattern(probe))))
    assert all(b <= a + 1e-4 for a, b in zip(energies, energies[1:]))


def test_retrieval_degrades_above_capacity_and_storkey_beats_hebbian():
    d = 256

    def mean_error(rule, n):
        masks = _patterns(n, d, seed=9)
        store = H.HopfieldMaskStore(d, rule)
        store.store_all(masks)
        out = store.recall(_flip(masks, 0.15, 10), steps=20, mode="sync")
        return float((out != masks).sum(-1).float().mean())

    assert mean_error("storkey", 10) == 0
    assert mean_error("storkey", 120) > 20  # far above d / sqrt(2 ln d) ~ 76
    assert mean_error("hebbian", 40) > 10 * max(mean_error("storkey", 40), 0.1)


def _noisy_preference(target, fraction, seed):
    """An objective that prefers a corrupted copy of ``target``: its own optimum is wrong in ``fraction`` bits."""
    hint = H.to_pattern(_flip(target, fraction, seed))

    def objective(mask):
        return -((2 * mask - 1) * hint).mean()

    return objective, hint


@pytest.mark.parametrize("binarizer,gradient,settings", [
    ("ste", "memory", {}),  # the paper's settings: lr 500, momentum 0.9, weight decay 1e-4, gamma 1.5e-3
    ("ste", "plain", {}),
    # sigmoid(s) saturates at once under lr 500; a small lr and a strong energy instead
    ("sigmoid", "plain", {"lr": 5.0, "gamma": 0.5, "weight_decay": 0.0}),
])
def test_recover_cleans_a_noisy_objective_into_the_stored_mask(binarizer, gradient, settings):
    d = 256
    masks = _patterns(6, d, seed=11)
    store = H.HopfieldMaskStore(d)
    store.store_all(masks)
    for t in range(len(masks)):
        objective, hint = _noisy_preference(masks[t], 0.2, seed=100 + t)
        got = H.recover(store, objective, init="zeros", binarizer=binarizer, gradient=gradient, **settings)
        assert got.dtype == torch.bool and got.shape == (d,)
        assert int((got != masks[t]).sum()) == 0
    # Without the Hopfield term the plain descent lands on the objective's corrupted optimum (no weight
    # decay: with nothing holding the scores up as the objective's weight falls to 0, it would shrink them)
    alone = H.recover(store, objective, init="zeros", binarizer=binarizer, gradient="plain",
                      **{**settings, "gamma": 0.0, "weight_decay": 0.0})
    assert torch.equal(alone, hint > 0) and int((alone != masks[-1]).sum()) > 0.1 * d


def test_memory_gradient_recovers_where_the_plain_gradient_is_led_astray():
    """An objective whose gradient mostly points at a mask stored nowhere (as an entropy that
    confidently wrong masks also lower): the plain gradient (the paper's) follows it, the
    gradient through the memory (``Psi g``) keeps only the part the stored masks span."""
    d = 512
    gen = torch.Generator().manual_seed(0)
    masks = _patterns(5, d, seed=20)
    store = H.HopfieldMaskStore(d)
    store.store_all(masks)
    decoy = H.to_pattern(torch.rand(d, generator=gen) < 0.5)
    for t in range(len(masks)):
        target = H.to_pattern(masks[t])

        def objective(mask):
            return -((2 * mask - 1) * (target + 3 * decoy)).mean() / 4

        through_memory = H.recovery_trace(store, objective, masks[t])
        assert through_memory["final_hamming"] == 0, through_memory["hamming"]
        assert through_memory["steps_to_converge"] <= 10
        plain = H.recovery_trace(store, objective, masks[t], gradient="plain")
        assert plain["final_hamming"] > 0.2 * d, plain["hamming"]


def test_recovery_trace_records_every_step():
    d = 128
    masks = _patterns(3, d, seed=21)
    store = H.HopfieldMaskStore(d)
    store.store_all(masks)
    objective, _ = _noisy_preference(masks[1], 0.1, seed=22)
    seen = []
    got = H.recover(store, objective, steps=12, on_step=lambda b, m: seen.append((b, m.clone())))
    tr = H.recovery_trace(store, objective, masks[1], steps=12)
    assert [b for b, _ in seen] == list(range(1, 13)) and torch.equal(seen[-1][1], got)
    assert tr["hamming"] == [int((m != masks[1]).sum()) for _, m in seen]
    assert tr["final_hamming"] == tr["hamming"][-1] == 0 and torch.equal(tr["mask"], masks[1])
    first = tr["steps_to_converge"]
    assert first is not None and all(h == 0 for h in tr["hamming"][first - 1:]) and (first == 1 or tr["hamming"][first - 2] > 0)


def test_layered_memory_is_one_memory_per_layer():
    sizes = (40, 24)
    masks = _patterns(4, sum(sizes), seed=23)
    layered = H.LayeredMaskMemory.storkey(sizes)
    layered.store_all(masks)
    parts = [H.HopfieldMaskStore(n) for n in sizes]
    for m in masks:
        parts[0].store(m[:40])
        parts[1].store(m[40:])
    assert layered.d == 64 and layered.num_stored == 4 and layered.nbytes() == 4 * (40 ** 2 + 24 ** 2)
    for a, b in zip(layered.memories, parts):
        torch.testing.assert_close(a.psi, b.psi)
    x = torch.randn(64)
    torch.testing.assert_close(layered.mask_energy(x), parts[0].energy(x[:40]) + parts[1].energy(x[40:]))
    torch.testing.assert_close(layered.filter_gradient(x), torch.cat([parts[0].psi @ x[:40], parts[1].psi @ x[40:]]))
    torch.testing.assert_close(layered.pattern_mean(), (masks.float() * 2 - 1).mean(0))
    assert torch.equal(layered.recall(masks[2], steps=3), masks[2])
    with pytest.raises(SupsupError, match="last dimension"):
        layered.store(torch.ones(63, dtype=torch.bool))
    with pytest.raises(SupsupError, match="do not match"):
        H.LayeredMaskMemory([H.HopfieldMaskStore(8)], sizes=[9])
    with pytest.raises(SupsupError, match="at least one"):
        H.LayeredMaskMemory([])


def test_recover_validates_input():
    store = H.HopfieldMaskStore(8)
    with pytest.raises(SupsupError):
        H.recover(store, lambda m: m.sum(), binarizer="tanh")
    with pytest.raises(SupsupError, match="gradient"):
        H.recover(store, lambda m: m.sum(), gradient="psi")
    with pytest.raises(SupsupError, match="lr"):
        H.recover(store, lambda m: m.sum(), lr=float("nan"))
    with pytest.raises(SupsupError, match="weight_decay"):
        H.recover(store, lambda m: m.sum(), weight_decay=-1.0)
    with pytest.raises(SupsupError, match="steps"):
        H.recover(store, lambda m: m.sum(), steps=0)
    with pytest.raises(SupsupError, match="target"):
        H.recovery_trace(store, lambda m: m.sum(), torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(SupsupError, match="shape"):
        store.filter_gradient(torch.zeros(7))
    with pytest.raises(SupsupError):
        H.recover(store, lambda m: m, steps=3)  # not a scalar
    with pytest.raises(SupsupError):
        H.recover(store, lambda m: m.sum(), init=torch.zeros(7))
    with pytest.raises(SupsupError):
        store.store(torch.tensor([0, 1, 2, 0, 0, 0, 0, 0]))
    with pytest.raises(SupsupError):
        store.store(torch.ones(9, dtype=torch.bool))
    with pytest.raises(SupsupError):
        H.HopfieldMaskStore(8, rule="oja")


def test_gate_before_or_after_the_activation_gives_the_same_outputs_for_binary_masks():
    x = torch.randn(6, 20)
    mask = torch.rand(28, generator=torch.Generator().manual_seed(5)) < 0.5
    for act in ("relu", "swish"):
        after = H.HiddenMaskedMLP((20, 16, 12, 3), seed=4, activation=act)
        before = H.HiddenMaskedMLP((20, 16, 12, 3), seed=4, activation=act, gate="before_activation")
        torch.testing.assert_close(before(x, mask.float()), after(x, mask.float()))
    swish = H.HiddenMaskedMLP((20, 16, 3), seed=4, norm="none", activation="swish")
    h = x @ swish.weight0.T
    torch.testing.assert_close(swish(x, torch.ones(16)), (h * torch.sigmoid(h)) @ swish.weight1.T)
    with pytest.raises(SupsupError, match="activation"):
        H.HiddenMaskedMLP((20, 16, 3), activation="tanh")
    with pytest.raises(SupsupError, match="gate"):
        H.HiddenMaskedMLP((20, 16, 3), gate="inside")


def test_train_unit_mask_validates_input():
    model = H.HiddenMaskedMLP((4, 3, 2), norm="none")
    batches = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))]
    with pytest.raises(SupsupError, match="optimizer"):
        H.train_unit_mask(model, batches, steps=1, optimizer="lbfgs")
    with pytest.raises(SupsupError, match="init"):
        H.train_unit_mask(model, batches, steps=1, init="ones")
    with pytest.raises(SupsupError, match="steps"):
        H.train_unit_mask(model, batches, steps=0)
    m = H.train_unit_mask(model, batches, steps=2, optimizer="sgd", init="zeros")
    assert m.dtype == torch.bool and m.shape == (3,)


def test_hidden_masked_mlp_gates_units():
    model = H.HiddenMaskedMLP((20, 16, 12, 3), seed=4, norm="none")
    assert model.d == 28
    x = torch.randn(5, 20)
    ones, zeros = torch.ones(28), torch.zeros(28)
    w0, w1, w2 = model.weight0, model.weight1, model.weight2
    ref = torch.relu(torch.relu(x @ w0.T) @ w1.T) @ w2.T
    torch.testing.assert_close(model(x, ones), ref)
    assert torch.count_nonzero(model(x, zeros)) == 0
    m = torch.ones(28)
    m[16:] = 0  # all second-layer units off
    assert torch.count_nonzero(model(x, m)) == 0
    torch.testing.assert_close(w0, reference.signed_constant(4, 0, (16, 20), format_version=1))
    with pytest.raises(SupsupError):
        model(x, torch.ones(27))


def test_exact_recovery_of_trained_split_mnist_masks_from_unlabelled_batches():
    """The paper's network and recovery at CI size: masks of two SplitMNIST tasks (digits 0/1 and
    6/7) on a 784-256-256-10 BNNet (Swish, mask as the batch norm's scale, ten digit outputs),
    one Storkey memory per layer; each mask comes back exactly from test batches alone, and
    scores what the exact mask scores."""
    from supsup_fast import data

    bench = data.SplitMNIST(data.mnist_5k(), flatten=True, remap_labels=False)
    model = H.HiddenMaskedMLP((784, 256, 256, 10), seed=0, activation="swish", gate="before_activation")
    tasks = (0, 3)
    masks = [H.train_unit_mask(model, bench.infinite_batches(t, 128), steps=30, lr=0.1, optimizer="sgd",
                               weight_decay=1e-4, init="zeros") for t in tasks]
    assert int((masks[0] != masks[1]).sum()) > 100
    memory = H.LayeredMaskMemory.storkey(model.hidden)
    memory.store_all(masks)
    for i, t in enumerate(tasks):
        batches = bench.infinite_batches(t, 64, seed=1, split="test")
        trace = H.recovery_trace(memory, lambda m: reference.entropy(model(next(batches)[0], m)), masks[i])
        assert trace["final_hamming"] == 0 and trace["steps_to_converge"] <= 10, trace["hamming"]
        exact = H.mask_accuracy(model, masks[i], bench.test_loader(t, 500))
        assert exact > 0.9 and H.mask_accuracy(model, trace["mask"], bench.test_loader(t, 500)) == exact


def test_recovery_report():
    exact = [torch.tensor([1, 0, 1, 1], dtype=torch.bool), torch.tensor([0, 0, 1, 0], dtype=torch.bool)]
    rec = [torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])]
    r = H.recovery_report(exact, rec, lambda t, m: float(m.sum()))
    assert [row["hamming"] for row in r["tasks"]] == [0, 2]
    assert r["exact_recoveries"] == 1 and r["mean_hamming"] == 1.0
    assert r["tasks"][1]["exact_acc"] == 1.0 and r["tasks"][1]["recovered_acc"] == 3.0
    with pytest.raises(SupsupError):
        H.recovery_report(exact, rec[:1])
