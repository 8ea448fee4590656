"""fit_task / evaluate on small synthetic tasks, and task inference on the masks they learn."""

import pytest
import torch
from torch import nn

from supsup_fast import convert, inference, training
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError

D, C, S = 20, 10, 10  # inputs, real classes, superfluous outputs


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_task(i):
    """Task ``i``: C Gaussian blobs around task-specific random centres."""
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(1000 + i)) * 1.5

    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, C, (n,), generator=g)
        return centres[y] + 0.7 * torch.randn(n, D, generator=g), y

    return sample


def batches_of(sample, n, seed, bs=32):
    x, y = sample(n, seed)
    return [(x[j:j + bs], y[j:j + bs]) for j in range(0, n, bs)]


def net(outputs=C, **cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, outputs))
    return convert.convert_(model, SupsupConfig(**cfg))


@pytest.mark.parametrize("binariser", ["topk", "threshold"])
def test_fit_task_learns_a_mask_to_high_accuracy(binariser):
    model = net(binariser=binariser)
    sample = blob_task(0)
    stats = training.fit_task(model, batches_of(sample, 256, 0), iterations=120, optimizer="adam", lr=0.02,
                              progress=False)
    assert stats["task"] == 0 and stats["iterations"] == 120 and len(stats["losses"]) == 120
    assert sum(stats["losses"][-10:]) < 0.3 * sum(stats["losses"][:10])
    assert len(stats["accuracy"]) == 120 and all(0.0 <= a <= 1.0 for a in stats["accuracy"])
    assert convert.num_tasks(model) == 1
    with pytest.raises(SupsupError, match="no task is in training"):  # the task is frozen: nothing trains
        convert.task_parameters(model)
    got = training.evaluate(model, batches_of(sample, 256, 99), task=0)
    assert got["accuracy"] > 0.95 and got["count"] == 256
    # before training, the random mask is near chance
    fresh = net(binariser=binariser)
    convert.begin_task(fresh)
    convert.freeze_task(fresh)
    assert training.evaluate(fresh, batches_of(sample, 256, 99), task=0)["accuracy"] < 0.5


def test_tasks_keep_their_accuracy_and_are_inferred_with_superfluous_neurons():
    model = net(outputs=C + S, binariser="threshold")
    tasks = [blob_task(i) for i in range(3)]
    for i, sample in enumerate(tasks):
        assert training.fit_task(model, batches_of(sample, 256, i), iterations=120, optimizer="adam", lr=0.02,
                                 progress=False)["task"] == i
    model.eval()
    for i, sample in enumerate(tasks):
        x, y = sample(64, 500 + i)
        assert training.evaluate(model, [(x, y)], task=i)["accuracy"] > 0.9
        with torch.no_grad():
            convert.set_task(model, i)
            logits = model(x)
        # cross-entropy over all outputs pushed the superfluous neurons below the real winner
        assert (logits[:, C:].max(-1).values < logits[:, :C].max(-1).values).all()
        for objective in ("entropy", "g"):
            res = inference.infer_task(model, x, objective=objective, num_real=C, rows=None)
            assert int(res.task_ids[0]) == i
        got = inference.evaluate_inference(model, [(x, y)], task=i, objective="g", num_real=C, rows=None)
        assert got["task_accuracy"] == 1.0 and got["accuracy"] > 0.9


def test_transfer_init_starts_from_the_mean_of_earlier_scores():
    model = net(binariser="topk", score_init="transfer")
    seen = []

    def factory(params):
        seen.append([p.detach().clone() for p in params])
        return torch.optim.Adam(params, lr=0.02)

    for i in range(3):
        training.fit_task(model, batches_of(blob_task(i), 256, i), iterations=60, optimizer=factory, progress=False)
    assert len(seen) == 3
    # the first task starts from Kaiming-uniform scores, the second from the first's final scores
    assert not any(torch.equal(s, seen[1][j]) for j, s in enumerate(seen[0]))
    for i in range(3):
        assert training.evaluate(model, batches_of(blob_task(i), 256, 50 + i), task=i)["accuracy"] > 0.9


def test_transfer_init_equals_running_mean_of_final_scores():
    model = net(binariser="threshold", score_init="transfer")
    finals = []

    def record(step, loss):
        if step == 29:
            finals.append([p.detach().clone() for p in convert.task_parameters(model)])

    starts = []

    def factory(params):
        starts.append([p.detach().clone() for p in params])
        return torch.optim.Adam(params, lr=0.02)

    for i in range(3):
        training.fit_task(model, batches_of(blob_task(i), 64, i), iterations=30, optimizer=factory, on_step=record,
                          progress=False)
    for j in range(len(starts[0])):
        torch.testing.assert_close(starts[1][j], finals[0][j])
        torch.testing.assert_close(starts[2][j], (finals[0][j] + finals[1][j]) / 2)


def test_optimizers_schedulers_and_early_stop():
    sample = blob_task(1)
    for opt in ("rmsprop", "sgd", "adam"):
        model = net()
        stats = training.fit_task(model, batches_of(sample, 64, 0), iterations=5, optimizer=opt, progress=False)
        assert stats["iterations"] == 5
    model = net()
    lrs = []

    def factory(params):
        opt = torch.optim.SGD(params, lr=0.5)
        lrs.append(opt)
        return opt

    training.fit_task(model, batches_of(sample, 64, 0), iterations=8, optimizer=factory, scheduler="cosine",
                      progress=False)
    assert lrs[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    stats = training.fit_task(model, batches_of(sample, 64, 0), iterations=50, progress=False,
                              on_step=lambda step, loss: step == 3)
    assert stats["iterations"] == 4 and stats["task"] == 1 and convert.num_tasks(model) == 2


def test_fit_task_reopens_a_frozen_task():
    model = net()
    sample = blob_task(2)
    training.fit_task(model, batches_of(sample, 256, 0), iterations=60, optimizer="adam", lr=0.02, progress=False)
    before = training.evaluate(model, batches_of(sample, 256, 9), task=0)["accuracy"]
    stats = training.fit_task(model, batches_of(sample, 256, 1), iterations=30, optimizer="adam", lr=0.005,
                              task=0, progress=False)
    assert stats["task"] == 0 and convert.num_tasks(model) == 1
    assert training.evaluate(model, batches_of(sample, 256, 9), task=0)["accuracy"] >= before - 0.05


def test_bad_arguments_raise_supsup_errors():
    model = net()
    b = batches_of(blob_task(0), 64, 0)
    with pytest.raises(SupsupError, match="iterations"):
        training.fit_task(model, b, iterations=0)
    with pytest.raises(SupsupError, match="optimizer"):
        training.fit_task(model, b, iterations=2, optimizer="lbfgs")
    with pytest.raises(SupsupError, match="scheduler"):
        training.fit_task(model, b, iterations=2, scheduler="step")
    with pytest.raises(SupsupError, match="ran out"):
        training.fit_task(model, iter(b), iterations=5, progress=False)
    convert.freeze_task(model)  # the failed run above left its task open
    with pytest.raises(SupsupError, match="no batches"):
        training.evaluate(model, [], task=0)
    with pytest.raises(SupsupError, match="masked layers"):
        training.fit_task(nn.Sequential(nn.Linear(2, 2)), b, iterations=1)


def test_evaluate_restores_mode_and_training_flag():
    model = net()
    for i in range(2):
        training.fit_task(model, batches_of(blob_task(i), 64, i), iterations=3, progress=False)
    convert.set_task(model, 1)
    model.train()
    training.evaluate(model, batches_of(blob_task(0), 64, 5), task=0)
    assert model.training
    assert all(m.mode == "task" and m.task_id == 1 for m in convert.masked_layers(model))


@pytest.mark.parametrize("poison", ["nan_input", "inf_loss"])
def test_a_non_finite_loss_stops_training_before_any_update(poison):
    model = net()
    good = batches_of(blob_task(0), 64, seed=1)
    x_bad, y_bad = good[1][0].clone(), good[1][1]
    loss_fn = torch.nn.functional.cross_entropy
    if poison == "nan_input":
        x_bad[3, 5] = float("nan")
    else:
        def loss_fn(logits, y, calls=[0]):  # finite on the first batch, inf on the second
            calls[0] += 1
            return torch.nn.functional.cross_entropy(logits, y) * (float("inf") if calls[0] == 2 else 1.0)
    seen = []
    with pytest.raises(SupsupError, match=r"task 0, step 1\).*loss is not finite.*nothing was updated"):
        training.fit_task(model, [good[0], (x_bad, y_bad)], iterations=2, optimizer="adam", lr=0.05,
                          progress=False, loss_fn=loss_fn,
                          on_step=lambda step, loss: seen.append([p.detach().clone() for p in
                                                                  convert.task_parameters(model)]) and None)
    # the scores are those after the first (finite) step: the refused step touched none of them
    after = [p.detach() for p in convert.task_parameters(model)]
    assert len(seen) == 1 and all(torch.equal(a, b) for a, b in zip(seen[0], after))
    assert all(bool(torch.isfinite(p).all()) for p in after)
