"""NNs: the novelty criterion, the trainer's decisions, its slot gradients, and an end-to-end stream."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_fast import convert, format, inference, nns, training
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError
from supsup_fast.nn import MaskedLayerBase

D, C, H = 32, 10, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_task(i):
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(1000 + i)) * 2.0

    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, C, (n,), generator=g)
        return centres[y] + 0.7 * torch.randn(n, D, generator=g), y

    return sample


def net(dims=(D, H, H, C), binariser="threshold"):
    torch.manual_seed(0)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return convert.convert_(nn.Sequential(*layers), SupsupConfig(binariser=binariser))


# --------------------------------------------------------------------------------------
# The criterion
# --------------------------------------------------------------------------------------
def test_is_novel_is_k_times_max_belief_below_one_plus_epsilon():
    assert nns.is_novel(torch.zeros(5), 5)  # uniform belief: 5 * 1/5 = 1 < 1.125
    assert not nns.is_novel(torch.tensor([-3.0, 0, 0, 0, 0]), 5)
    # boundary: g = [-a, 0, 0, 0] gives max nu = e^a / (e^a + 3); k * max nu = 1 + eps at a*
    k, eps = 4, 2.0 ** -3
    a_star = math.log(3 * (1 + eps) / (k - 1 - eps))
    assert nns.is_novel(torch.tensor([-(a_star - 1e-3), 0.0, 0.0, 0.0]), k, eps)
    assert not nns.is_novel(torch.tensor([-(a_star + 1e-3), 0.0, 0.0, 0.0]), k, eps)
    # k and the number of slots are independent: 1 * max nu <= 1 is always "novel" for eps > 0
    assert nns.is_novel(torch.tensor([-50.0, 0.0, 0.0]), 1)
    assert not nns.is_novel(torch.tensor([-3.0, 0.0, 0.0]), 3)
    for bad in (torch.zeros(0), torch.zeros(2, 2), [0.0, 1.0]):
        with pytest.raises(SupsupError, match="grad_alpha"):
            nns.is_novel(bad, 2)
    with pytest.raises(SupsupError, match="k must"):
        nns.is_novel(torch.zeros(3), 0)


@pytest.mark.parametrize("seed", range(20))
def test_is_novel_matches_the_formula_on_random_gradients(seed):
    g = torch.randn(int(torch.randint(1, 9, (1,), generator=torch.Generator().manual_seed(seed))),
                    generator=torch.Generator().manual_seed(seed + 100)) * 2
    k = int(torch.randint(1, 12, (1,), generator=torch.Generator().manual_seed(seed + 200)))
    want = k * float(torch.softmax(-g.double(), 0).max()) < 1.125
    assert nns.is_novel(g, k) == want


# --------------------------------------------------------------------------------------
# The trainer acts exactly on the criterion
# --------------------------------------------------------------------------------------
def scripted(trainer, grads):
    """Make the trainer's checks see the given slot gradients, in order."""
    it = iter(grads)
    trainer.slot_gradients = lambda x: next(it)


def test_trainer_allocates_exactly_when_the_criterion_says():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, "adam", lr=0.01, check_every=2, min_slots=3, budget=3, own_entropy=None)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    grads = [
        torch.tensor([-5.0, 0.0, 0.0]),        # mask 0 clearly best: continue
        torch.tensor([0.0, 0.01, 0.0]),        # near uniform: new mask 1
        torch.tensor([-5.0, 0.0, 0.0]),        # frozen mask 0 best: switch back to 0 (reopened)
        torch.tensor([0.0, -5.0, 0.0]),        # mask 1 best: switch to 1
        torch.tensor([0.0, 0.0, -5.0]),        # an untrained slot wins: new mask 2
        torch.tensor([0.1, 0.0, 0.05]),        # near uniform with 3 masks: budget of 3 exhausted
    ]
    scripted(tr, grads)
    tr.step(x, y)
    assert tr.current == 0 and tr.num_masks == 1
    want = [("continue", 0, 1), ("new", 1, 2), ("switch", 0, 2), ("switch", 1, 2), ("new", 2, 3)]
    for decision, current, masks in want:
        tr.step(x, y)
        tr.step(x, y)
        rec = tr.history[-1]
        assert (rec["decision"], tr.current, tr.num_masks) == (decision, current, masks)
        assert convert.task_parameters(model)  # a mask is always open for training
    tr.step(x, y)
    with pytest.raises(SupsupError, match="budget"):
        tr.step(x, y)
    assert tr.finish() == 3 and convert.num_tasks(model) == 3


def test_switching_back_keeps_the_stored_mask_until_trained():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, "sgd", lr=1e-9, check_every=1, min_slots=2, own_entropy=None)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    scripted(tr, [torch.tensor([0.0, 0.0]), torch.tensor([-9.0, 0.0])])
    tr.step(x, y)  # allocate 0
    tr.step(x, y)  # uniform: new mask 1 (mask 0 frozen)
    stored = [m.bank[0].clone() for m in model if isinstance(m, MaskedLayerBase)]
    tr.step(x, y)  # reopen 0: its live mask is exactly the stored one
    assert tr.history[-1]["decision"] == "switch" and tr.current == 0
    for m, words in zip([m for m in model if isinstance(m, MaskedLayerBase)], stored):
        assert torch.equal(format.pack(m.current_mask() != 0, m.weight.shape), words)


def test_paper_literal_k_always_allocates_at_the_first_check():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, check_every=1, k_mode="allocated", own_entropy=None)
    scripted(tr, [torch.tensor([-50.0, 0, 0, 0, 0])])
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    tr.step(x, y)
    tr.step(x, y)
    assert tr.history[-1]["decision"] == "new" and tr.num_masks == 2


def test_own_entropy_test_allocates_when_the_believed_mask_is_unsure():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, "adam", lr=0.01, check_every=2, min_slots=3)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    scripted(tr, [torch.tensor([-5.0, 0.0, 0.0])] * 3)
    entropies = iter([0.1, 0.9])  # the believed mask's own network: sure, then unsure
    tr.own_network_entropy = lambda xs, slot: (next(entropies), 0.5)
    for _ in range(5):
        tr.step(x, y)
    # batch 2: belief picks mask 0, its own entropy 0.1 <= 0.5 -> continue; batch 4: 0.9 > 0.5 -> new
    assert [(h["decision"], h["novel_by"]) for h in tr.history] == [("continue", None), ("new", "own_entropy")]
    assert tr.num_masks == 2


def test_own_entropy_is_not_asked_of_a_mask_still_learning():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, check_every=5, min_slots=2)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    scripted(tr, [torch.tensor([0.0, 0.0])] + [torch.tensor([0.0, -9.0])] * 3)
    asked = []
    tr.own_network_entropy = lambda xs, slot: asked.append(slot) or (0.1, 0.5)
    tr.step(x, y)  # allocate 0
    assert tr.check(x)["decision"] == "new"  # uniform: mask 1 opened now
    # mask 1 (the one in training, trained for 0 < check_every batches) best: not judged by its entropy
    assert tr.check(x)["decision"] == "continue" and asked == []
    for _ in range(5):
        tr.step(x, y)  # the check at batch 5: mask 1 trained 4 batches, not yet judged
    assert tr.history[-1]["batch"] == 5 and asked == []
    assert tr.check(x)["decision"] == "continue" and asked == [1]  # trained 5 batches: judged


def test_own_network_entropy_is_the_masks_own_output_entropy():
    model = net(dims=(6, 8, 4))
    tr = nns.NNsTrainer(model, "sgd", lr=0.1, check_every=100)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    tr.step(x, y)
    tr.finish()
    convert.begin_task(model)  # a second mask open for training: measuring mask 0 must not disturb it
    model.train()
    h, limit = tr.own_network_entropy(x, 0)
    assert model.training and convert.task_parameters(model)
    assert limit == pytest.approx(0.5 * math.log(4))
    convert.set_task(model, 0)
    model.eval()
    with torch.no_grad():
        want = float(inference.entropy_rows(model(x)).mean())
    assert h == pytest.approx(want, rel=1e-6)


def test_bad_trainer_arguments():
    model = net(dims=(6, 8, 4))
    for kw in ({"check_every": 0}, {"min_slots": 0}, {"budget": 0}, {"k_mode": "x"}, {"temperature": 0.0},
               {"epsilon": -1.0}, {"rows": 0}, {"own_entropy": 0.0}, {"own_entropy": 1.5}):
        with pytest.raises(SupsupError):
            nns.NNsTrainer(model, **kw)
    with pytest.raises(SupsupError, match="masked layers"):
        nns.NNsTrainer(nn.Sequential(nn.ReLU()))


# --------------------------------------------------------------------------------------
# Slot gradients equal autograd through an explicit float superposition of the slots
# --------------------------------------------------------------------------------------
def explicit_slot_grad(model, tr, x):
    layers = [m for m in model if isinstance(m, MaskedLayerBase)]
    f = convert.num_tasks(model)
    k = tr.num_masks
    s = max(k, tr.min_slots)
    per_layer = []
    for i, m in enumerate(layers):
        slots = [format.unpack(m.bank[t], m.weight.shape, torch.float32) for t in range(f)]
        live = m.current_mask().float()
        if tr.current < f:
            slots[tr.current] = live
        else:
            slots.append(live)
        slots += [format.unpack(tr._padding_words(p)[i], m.weight.shape, torch.float32) for p in range(k, s)]
        per_layer.append(torch.stack(slots))
    alpha = torch.full((s,), 1.0 / s, requires_grad=True)
    h, li = x, 0
    for m in model:
        if isinstance(m, MaskedLayerBase):
            h = F.linear(h, m.weight * torch.einsum("t,t...->...", alpha, per_layer[li]))
            li += 1
        else:
            h = m(h)
    (g,) = torch.autograd.grad(inference.entropy_rows(h).mean(), alpha)
    return g


@pytest.mark.parametrize("frozen,reopen", [(0, False), (2, False), (6, False), (2, True), (6, True)])
def test_slot_gradients_match_explicit_superposition(frozen, reopen):
    model = net(dims=(7, 9, 8, 5))
    for _ in range(frozen):
        convert.begin_task(model)
        convert.freeze_task(model)
    convert.begin_task(model, 1 if reopen else None)
    with torch.no_grad():
        for p in convert.task_parameters(model):
            p.normal_()
    tr = nns.NNsTrainer(model, min_slots=5)
    x = torch.randn(6, 7) * 2
    g = tr.slot_gradients(x)
    assert g.shape == (max(tr.num_masks, 5),)
    torch.testing.assert_close(g, explicit_slot_grad(model, tr, x), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# End to end: two tasks arrive in sequence (then the first again): exactly two masks
# --------------------------------------------------------------------------------------
def test_two_tasks_in_sequence_allocate_exactly_two_masks():
    model = net()
    tr = nns.NNsTrainer(model, "adam", lr=0.02, check_every=25)
    a, b = blob_task(0), blob_task(1)
    for phase, (sample, n) in enumerate([(a, 75), (b, 75), (a, 50)]):
        for i in range(n):
            tr.step(*sample(32, phase * 10_000 + i))
    decisions = [(h["batch"], h["decision"], h["to"]) for h in tr.history]
    assert [d for d in decisions if d[1] != "continue"] == [(75, "new", 1), (150, "switch", 0)], decisions
    assert tr.finish() == 2
    assert training.evaluate(model, [a(256, 777)], task=0)["accuracy"] > 0.8
    assert training.evaluate(model, [b(256, 778)], task=1)["accuracy"] > 0.8


def test_checks_leave_the_open_tasks_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    model = convert.convert_(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)),
                             SupsupConfig(binariser="threshold"))
    tr = nns.NNsTrainer(model, check_every=1)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    tr.step(x, y)
    bn = model[1]
    before = (bn.task_mean.clone(), bn.task_var.clone())
    g = tr.slot_gradients(x * 3 + 1)
    assert g.shape == (5,) and torch.isfinite(g).all()
    assert torch.equal(bn.task_mean, before[0]) and torch.equal(bn.task_var, before[1])


def test_a_batch_with_nan_is_refused_before_the_check_and_the_update():
    model = net()
    tr = nns.NNsTrainer(model, "adam", lr=0.02, check_every=2)
    a = blob_task(0)
    tr.step(*a(32, 0))
    tr.step(*a(32, 1))
    before = [p.detach().clone() for p in convert.task_parameters(model)]
    x, y = a(32, 2)
    x[7, 0] = float("nan")
    with pytest.raises(SupsupError, match=r"batch 2\): x holds NaN or inf"):
        tr.step(x, y)
    assert tr.history == [] and tr.batches_seen == 2  # the check due at batch 2 did not run on it
    assert all(torch.equal(p0, p1.detach()) for p0, p1 in zip(before, convert.task_parameters(model)))
    tr.step(*a(32, 3))  # the stream goes on
    assert len(tr.history) == 1
