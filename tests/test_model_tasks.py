"""The task protocol over a whole model: names, deletion, the training guards, per-row tasks."""

import pytest
import torch
from torch import nn

import supsup_fast as sf
from supsup_fast import SupsupConfig, SupsupError

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return sf.convert_(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)),
                       SupsupConfig(density=0.5, seed=1))


def convnet():
    return sf.convert_(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(4 * 5 * 5, 3)), SupsupConfig(density=0.5, seed=2),
                       modules_to_save=["4"])


def learn(model, x, names, steps=3):
    for name in names:
        with sf.task(model, name=name) as params:
            opt = torch.optim.Adam(params, lr=0.05)
            model.train()
            for _ in range(steps):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
    model.eval()


def test_named_tasks_select_rename_delete():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(8, 10)
    learn(model, x, ["a", "b", "c"])
    assert sf.tasks(model) == ["a", "b", "c"] and sf.task_id(model, "b") == 1
    outs = {}
    for n in ("a", "b", "c"):
        sf.set_task(model, n)
        outs[n] = model(x).detach()
    sf.rename_task(model, "b", "beta")
    assert sf.tasks(model) == ["a", "beta", "c"]
    with pytest.raises(SupsupError, match="already has a task named 'a'"):
        sf.rename_task(model, "c", "a")
    sf.delete_task(model, "a")
    assert sf.tasks(model) == ["beta", "c"] and sf.num_tasks(model) == 2
    for n, want in (("beta", outs["b"]), ("c", outs["c"])):
        sf.set_task(model, n)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with pytest.raises(SupsupError, match=r"no task named 'a'; its named tasks are \['beta', 'c'\]"):
        sf.set_task(model, "a")
    with pytest.raises(SupsupError, match="already has a task named 'c'"):
        sf.begin_task(model, name="c")
    assert sf.begin_task(model, "c") == 1  # reopening by name
    sf.discard_task(model)
    assert sf.tasks(model) == ["beta", "c"]


def test_task_context_discards_on_error_and_task_parameters_needs_an_open_task():
    model = mlp()
    with pytest.raises(SupsupError, match="no task is in training"):
        sf.task_parameters(model)
    with pytest.raises(RuntimeError, match="boom"):
        with sf.task(model, name="x"):
            raise RuntimeError("boom")
    assert sf.num_tasks(model) == 0 and sf.tasks(model) == []
    sf.begin_task(model)  # the discarded task left nothing open behind
    sf.freeze_task(model)
    assert sf.num_tasks(model) == 1


def test_set_task_without_tasks_says_so():
    model = mlp()
    with pytest.raises(SupsupError, match=r"no task yet; learn one"):
        sf.set_task(model, 0)
    with pytest.raises(SupsupError, match="no task is stored yet"):
        model[0].set_task(0)


def test_an_optimizer_left_over_from_the_previous_task_is_refused():
    model = mlp()
    x = torch.randn(8, 10)
    sf.begin_task(model)
    opt = torch.optim.SGD(sf.task_parameters(model), lr=0.1)
    model(x).sum().backward()
    opt.step()
    sf.freeze_task(model)
    sf.begin_task(model, name="second")
    model(x).sum().backward()
    with pytest.raises(SupsupError, match=r"holds the scores of task 0, which freeze_task stored and released"):
        opt.step()
    fresh = torch.optim.SGD(sf.task_parameters(model), lr=0.1)
    fresh.step()  # a new optimizer for the new task is fine
    sf.freeze_task(model)


def test_save_bank_refuses_an_open_task(tmp_path):
    from supsup_fast.checkpoint import save_bank

    model = mlp()
    sf.begin_task(model)
    with pytest.raises(SupsupError, match="save_bank: a task is in training"):
        save_bank(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("build, shape", [(mlp, (12, 10)), (convnet, (12, 2, 5, 5))])
def test_row_tasks_compute_each_row_with_its_own_task(build, shape):
    torch.manual_seed(3)
    model = build()
    x = torch.randn(*shape)
    learn(model, x, ["t0", "t1", "t2"])
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 0, 2])
    want = torch.empty(12, model(x).shape[1])
    for t in range(3):
        sf.set_task(model, t)
        with torch.no_grad():
            want[ids == t] = model(x)[ids == t]
    sf.set_row_tasks(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    sf.set_row_tasks(model, ["t1"] * 12)
    sf.set_task(model, 1)
    ref = model(x)
    sf.set_row_tasks(model, ["t1"] * 12)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(SupsupError, match="frozen tasks 0..2"):
        sf.set_row_tasks(model, torch.tensor([0, 3]))
    with pytest.raises(SupsupError, match="one id per row"):
        sf.set_row_tasks(model, torch.tensor([0, 1]))
        model(x)


def test_rows_mode_trains_nothing_and_a_frozen_model_has_no_trainable_parameter():
    model = mlp()
    assert [p for p in model.parameters() if p.requires_grad] == []
    x = torch.randn(4, 10)
    learn(model, x, [None])
    sf.set_row_tasks(model, torch.zeros(4, dtype=torch.int64))
    assert not model(x).requires_grad
