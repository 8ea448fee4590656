"""Task inference under bad inputs, loose arguments, training-mode models and threads.

* Non-finite input rows (NaN, +Inf, -Inf) and non-finite gradients from finite inputs: every method
  and batch mode ends within its pass bound and reports NO_TASK with confidence 0 for that unit.
* Rows never interact (hypothesis): a row's inferred task and confidence, and its GG output with
  per-row task ids (``task_logits``, the grouped op), do not depend on the other rows of the batch,
  NaN/Inf rows included, on every CPU backend.
* A training-mode model (shared BatchNorm, TaskBatchNorm, dropout) is evaluated in eval() mode and
  left exactly as it was.
* ``candidates`` is read as distinct integer ids or refused with a clear error.
* Two threads sharing one model get their own results; a foreign mode change or forward during a
  call is refused.
"""

from __future__ import annotations

import collections
import contextlib
import math
import signal
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from supsup_fast import convert, inference, nns, ops
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError

CPU_BACKENDS = [b.name for b in ops.backends() if b.available and "cpu" in b.devices]
METHODS = inference.METHODS
NONFINITE = (math.nan, math.inf, -math.inf)
HUGE = (1e308, -1e308)  # finite inputs whose activations overflow: a non-finite objective from finite rows
CASES: collections.Counter = collections.Counter()
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    lines = [f"  {k:<58} {v}" for k, v in sorted(CASES.items())]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        sys.stdout.write("\ninference robustness cases run:\n" + "\n".join(lines) + "\n")


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_):
        raise TimeoutError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def forced(backend: str):
    impls = next(b for b in ops.backends() if b.name == backend).impls
    return ops.force_backend(",".join(f"{op}={backend}" for op in impls))


# --------------------------------------------------------------------------------------
# Models with random stored tasks
# --------------------------------------------------------------------------------------
SHAPES = {"mlp": (6,), "conv": (2, 5, 5)}  # one input row of each architecture


def make_model(k=6, h=8, c=5, tasks=4, seed=0, norm=None, dtype=torch.float64, dropout=False, arch="mlp"):
    """An MLP (or a small conv net) with ``tasks`` random stored masks; ``norm``: None, "shared" (a
    plain BatchNorm) or "task" (TaskBatchNorm with per-task statistics)."""
    if arch == "conv":
        mods = [nn.Conv2d(2, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if norm is not None else [])
        mods += [nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, c)]
    else:
        mods = [nn.Linear(k, h)] + ([nn.BatchNorm1d(h)] if norm is not None else []) + [nn.ReLU()]
        mods += [nn.Dropout(0.5)] if dropout else []
        mods.append(nn.Linear(h, c))
    model = nn.Sequential(*mods).to(dtype)
    cfg = SupsupConfig(binariser="threshold", seed=seed, per_task_norm=(norm == "task"))
    convert.convert_(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        convert.begin_task(model)
        for p in convert.task_parameters(model):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if norm is not None:
            model.train()
            with torch.no_grad():
                model(torch.randn((32,) + SHAPES[arch], generator=gen, dtype=dtype) * 2 + 1)
        convert.freeze_task(model)
    return model.eval()


def rows_of(b, k=6, seed=1, dtype=torch.float64):
    return torch.randn(b, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def infer(model, x, method, **kw):
    kw.setdefault("batch_mode", "per_example")
    with time_limit(30):
        return inference.infer_task(model, x, method=method, max_steps=kw.pop("max_steps", 30), **kw)


# --------------------------------------------------------------------------------------
# Non-finite inputs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_a_nonfinite_row_gets_no_task_and_leaves_the_others_alone(method, value):
    model = make_model(tasks=5)
    x = rows_of(4)
    clean = infer(model, x, method)
    bad = x.clone()
    bad[1, 3] = value
    got = infer(model, bad, method)
    CASES[f"non-finite row [{method}]"] += 1
    assert got.task_ids[1] == inference.NO_TASK and got.confidence[1] == 0.0
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(got.task_ids[keep], clean.task_ids[keep])
    torch.testing.assert_close(got.confidence[keep], clean.confidence[keep], rtol=1e-6, atol=1e-7)
    assert bool(torch.isfinite(got.confidence).all())
    if method == "binary":
        assert got.passes <= clean.passes  # the bad row took no pass of its own


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_mode_with_a_nonfinite_row_claims_no_task(method, value):
    model = make_model(tasks=5)
    x = rows_of(4)
    x[2, 0] = value
    got = infer(model, x, method, batch_mode="batch", rows=None)
    CASES[f"non-finite batch [{method}]"] += 1
    assert got.task_ids.tolist() == [inference.NO_TASK] and got.confidence.tolist() == [0.0]
    # rows=1 looks at the first row only: the bad third row does not matter
    first = infer(model, x, method, batch_mode="batch", rows=1)
    assert first.task_ids.item() != inference.NO_TASK and 0.0 < first.confidence.item() <= 1.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_mode", inference.BATCH_MODES)
def test_every_row_nonfinite_ends_without_a_pass_and_claims_nothing(method, batch_mode):
    model = make_model(tasks=7)
    x = torch.full((3, 6), math.nan, dtype=torch.float64)
    got = infer(model, x, method, batch_mode=batch_mode, rows=None)
    CASES[f"all rows non-finite [{method}]"] += 1
    assert (got.task_ids == inference.NO_TASK).all() and (got.confidence == 0).all()
    assert got.passes == 0


@pytest.mark.parametrize("method", METHODS)
def test_overflowing_finite_input_gives_no_task_not_nan_confidence(method):
    # finite inputs whose logits overflow to +-Inf: the objective (and the alpha gradient) are NaN
    model = make_model(tasks=4, dtype=torch.float32)
    x = rows_of(3, dtype=torch.float32)
    x[0] = 3e38
    got = infer(model, x, method)
    CASES[f"overflowing row [{method}]"] += 1
    assert got.task_ids[0] == inference.NO_TASK and got.confidence[0] == 0.0
    assert (got.task_ids[1:] >= 0).all() and bool(torch.isfinite(got.confidence).all())


@pytest.mark.parametrize("norm", [None, "task", "shared"])
def test_alpha_gradients_are_nan_exactly_where_the_objective_is_not_finite(norm):
    model = make_model(tasks=3, norm=norm)
    x = rows_of(4)
    x[2, 1] = math.inf
    alpha = torch.full((3,), 1 / 3)
    g = inference.alpha_gradients(model, x, alpha, per_example=True)
    assert torch.isnan(g[2]).all() and bool(torch.isfinite(g[[0, 1, 3]]).all())
    assert torch.isnan(inference.alpha_gradients(model, x, alpha)).all()


def test_single_candidate_with_a_nonfinite_row():
    model = make_model(tasks=3)
    x = rows_of(3)
    x[0, 0] = math.nan
    got = infer(model, x, "binary", candidates=[2])
    assert got.task_ids.tolist() == [inference.NO_TASK, 2, 2] and got.confidence.tolist() == [0.0, 1.0, 1.0]


def test_predict_classify_and_task_logits_on_no_task_rows():
    model = make_model(tasks=3)
    x = rows_of(4)
    x[3, 2] = math.nan
    ids, classes = inference.predict(model, x, batch_mode="per_example")
    assert ids[3] == inference.NO_TASK and classes[3] == -1 and (classes[:3] >= 0).all()
    logits = inference.task_logits(model, x, ids)
    assert torch.isnan(logits[3]).all() and bool(torch.isfinite(logits[:3]).all())
    assert torch.equal(logits[:3].argmax(-1), classes[:3])
    none = torch.full((4,), inference.NO_TASK)
    assert torch.isnan(inference.task_logits(model, x, none)).all()
    assert (inference.classify(model, x, none) == -1).all()
    # batch mode looks at the first row only: the batch gets a task, the NaN row no class
    ids, classes = inference.predict(model, x, batch_mode="batch", rows=1)
    assert (ids == ids[0]).all() and ids[0] >= 0 and classes[3] == -1 and (classes[:3] >= 0).all()
    for bad in (torch.tensor([0, 1, 2, 3]), torch.tensor([0, -2, 0, 0]), torch.zeros(4),
                torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.bool)):
        with pytest.raises(SupsupError, match="task_ids"):
            inference.classify(model, x, bad)


def test_gradient_descent_and_chunk_arguments_are_checked():
    model = make_model(tasks=3)
    x = rows_of(2)
    for kw, what in ((dict(lr=math.inf), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=True), "lr"),
                     (dict(threshold=math.nan), "threshold"), (dict(threshold=2.0), "threshold"),
                     (dict(max_steps=True), "max_steps"), (dict(max_steps=2.5), "max_steps")):
        with pytest.raises(SupsupError, match=what):
            inference.infer_task(model, x, method="gradient_descent", **kw)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(SupsupError, match="chunk_elements"):
            inference.infer_task(model, x, batch_mode="per_example", chunk_elements=bad)


def test_the_novelty_test_refuses_nonfinite_gradients():
    with pytest.raises(SupsupError, match="finite"):
        nns.is_novel(torch.tensor([0.1, math.nan, 0.2]), 3)


# --------------------------------------------------------------------------------------
# Rows never interact (property tests)
# --------------------------------------------------------------------------------------
def other_rows(draw, b, shape, row):
    """A batch of ``b`` random rows, NaN / Inf rows mixed in (the tested ``row`` among them, less often)."""
    k = math.prod(shape)
    x = torch.tensor(draw(st.lists(st.floats(-3, 3, width=32), min_size=b * k, max_size=b * k)),
                     dtype=torch.float64).view(b, k)
    for r in range(b):
        if draw(st.integers(0, 3 if r == row else 1)) == 0:  # the row itself is non-finite less often
            x[r, draw(st.integers(0, k - 1))] = draw(st.sampled_from(NONFINITE + HUGE))
    return x.view((b,) + tuple(shape))


@st.composite
def inference_case(draw):
    tasks = draw(st.integers(1, 5))
    cands = draw(st.one_of(st.none(), st.sets(st.integers(0, tasks - 1), min_size=1).map(sorted)))
    b = draw(st.integers(2, 6))
    row = draw(st.integers(0, b - 1))
    return dict(tasks=tasks, candidates=cands, b=b, row=row, norm=draw(st.sampled_from([None, "task", "shared"])),
                method=draw(st.sampled_from(METHODS)), objective=draw(st.sampled_from(["entropy", "g"])),
                seed=draw(st.integers(0, 2**16)), others=draw(st.data()))


@pytest.mark.parametrize("arch", sorted(SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=inference_case())
@PROPERTY
def test_a_rows_inferred_task_does_not_depend_on_the_other_rows(backend, arch, case):
    model = make_model(tasks=case["tasks"], seed=case["seed"], norm=case["norm"], arch=arch)
    b, row = case["b"], case["row"]
    batch = other_rows(case["others"].draw, b, SHAPES[arch], row)
    alone = batch[row:row + 1]
    kw = dict(method=case["method"], objective=case["objective"], num_real=3, candidates=case["candidates"])
    with forced(backend):
        single = infer(model, alone, **kw)
        mixed = infer(model, batch, **kw)
    CASES[f"row independence: infer_task[{backend}, {arch}]"] += 1
    assert mixed.task_ids[row] == single.task_ids[0]
    torch.testing.assert_close(mixed.confidence[row], single.confidence[0], rtol=1e-9, atol=1e-12)
    if not bool(torch.isfinite(batch[row]).all()):
        assert mixed.task_ids[row] == inference.NO_TASK and mixed.confidence[row] == 0
    if mixed.task_ids[row] == inference.NO_TASK:
        assert mixed.confidence[row] == 0


@st.composite
def grouped_case(draw):
    tasks = draw(st.integers(1, 4))
    b = draw(st.integers(2, 7))
    row = draw(st.integers(0, b - 1))
    ids = draw(st.lists(st.integers(0, tasks - 1), min_size=b, max_size=b))
    return dict(tasks=tasks, b=b, row=row, ids=ids, seed=draw(st.integers(0, 2**16)), others=draw(st.data()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=grouped_case())
@PROPERTY
def test_a_rows_output_with_its_task_does_not_depend_on_the_other_rows(backend, case):
    """GG inference with a task id per row: the model (task_logits) and the grouped op itself."""
    model = make_model(tasks=case["tasks"], seed=case["seed"], norm="task")
    b, row = case["b"], case["row"]
    batch = other_rows(case["others"].draw, b, SHAPES["mlp"], row)
    ids = torch.tensor(case["ids"])
    with forced(backend):
        single = inference.task_logits(model, batch[row:row + 1], ids[row:row + 1])
        mixed = inference.task_logits(model, batch, ids)
        layer = convert.masked_layers(model)[0]
        x32 = batch.float()
        w = layer.weight.float()
        op_single = ops.masked_linear_grouped(x32[row:row + 1].contiguous(), w, layer.bank, ids[row:row + 1], None)
        op_mixed = ops.masked_linear_grouped(x32, w, layer.bank, ids, None)
    CASES[f"row independence: task_logits + grouped op[{backend}]"] += 1
    torch.testing.assert_close(mixed[row], single[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(op_mixed[row], op_single[0], rtol=2e-6, atol=1e-6, equal_nan=True)
    if bool((batch[row].abs() < 1e30).all()):  # a row that overflows nothing stays finite
        assert bool(torch.isfinite(mixed[row]).all()) and bool(torch.isfinite(op_mixed[row]).all())


# --------------------------------------------------------------------------------------
# Training-mode models
# --------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm", ["shared", "task"])
@pytest.mark.parametrize("method", METHODS)
def test_inference_in_train_mode_changes_no_statistics_and_couples_no_rows(norm, method):
    model = make_model(tasks=4, norm=norm, dropout=True)
    x = rows_of(5)
    expected = [infer(model, x[r:r + 1], method) for r in range(5)]  # eval mode, one row at a time
    model.train()
    model[0].eval()  # a mixed mode must come back as it was, module by module
    before = _state(model)
    got = infer(model, x, method)
    ids, classes = inference.predict(model, x, batch_mode="per_example", method=method, max_steps=30)
    CASES[f"train-mode model [{method}]"] += 1
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "inference changed the model's state"
    assert model.training and not model[0].training and all(m.training for m in list(model)[1:])
    assert got.task_ids.tolist() == [e.task_ids.item() for e in expected]
    torch.testing.assert_close(got.confidence, torch.cat([e.confidence for e in expected]), rtol=1e-9, atol=1e-12)
    assert torch.equal(ids, got.task_ids)
    model.eval()
    assert torch.equal(classes, inference.classify(model, x, ids))


def test_inference_while_a_task_is_in_training_leaves_its_statistics():
    model = make_model(tasks=3, norm="task")
    convert.begin_task(model)
    model.train()
    before = _state(model)
    infer(model, rows_of(4), "binary")
    inference.classify(model, rows_of(4), torch.tensor([0, 1, 2, 0]))
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.mode == "train" for m in convert.masked_layers(model)) and model.training


# --------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ([False, False, True], "integer task ids"),
    (torch.tensor([False, True, True]), "integer task ids"),
    ([1.9], "integer task ids"),
    ([0, 1.0], "integer task ids"),
    (torch.tensor([0.0, 1.0]), "integer task ids"),
    (np.array([True, False]), "integer task ids"),
    (True, "task ids"),
    ("01", "task ids"),
    ([[0, 1]], "integer task ids"),
    (torch.tensor([[0, 1]]), "1-D"),
    ([0, 3], "0..2"),
    ([-1], "0..2"),
    ([], "empty"),
    ([1, 1, 2], "more than once"),
    (torch.tensor([2, 0, 2]), "more than once"),
    (1.0, "task ids"),
])
def test_candidates_that_are_not_distinct_task_ids_are_refused(bad, match):
    model = make_model(tasks=3)
    with pytest.raises(SupsupError, match=match):
        inference.infer_task(model, rows_of(2), candidates=bad)
    CASES["candidates refused"] += 1


@pytest.mark.parametrize("good, ids", [
    ([2, 0], [0, 2]), ((1,), [1]), (2, [2]), (torch.tensor([1, 2]), [1, 2]), (np.array([0, 2]), [0, 2]),
    ([np.int64(1)], [1]), (torch.tensor(2), [2]), (range(3), [0, 1, 2]),
])
def test_candidates_as_task_ids(good, ids):
    model = make_model(tasks=3)
    got = inference.infer_task(model, rows_of(4), candidates=good, batch_mode="per_example", method="binary")
    assert set(got.task_ids.tolist()) <= set(ids)
    g = got.grads[0] if got.grads else None
    if len(ids) > 1:
        assert torch.equal(got.alphas[0][0] > 0, torch.isin(torch.arange(3), torch.tensor(ids)))
        assert g is not None


# --------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------
def test_two_threads_sharing_a_model_each_get_their_own_results():
    model = make_model(tasks=4, norm="task")
    x = rows_of(6)
    ids = torch.tensor([0, 3, 1, 1, 2, 0])
    want_inf = {m: infer(model, x, m) for m in METHODS}
    want_logits = inference.task_logits(model, x, ids)
    want_classes = inference.classify(model, x, ids)
    errors, counts = [], collections.Counter()
    start = threading.Barrier(2)

    def infer_loop():
        start.wait()
        for i in range(12):
            m = METHODS[i % 3]
            try:
                got = inference.infer_task(model, x, method=m, batch_mode="per_example", max_steps=30)
                ok = torch.equal(got.task_ids, want_inf[m].task_ids) and torch.equal(got.confidence,
                                                                                      want_inf[m].confidence)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                errors.append(repr(e))
                ok = False
            counts["infer ok" if ok else "infer wrong"] += 1

    def gg_loop():
        start.wait()
        for _ in range(30):
            try:
                ok = (torch.equal(inference.task_logits(model, x, ids), want_logits)
                      and torch.equal(inference.classify(model, x, ids), want_classes))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                ok = False
            counts["gg ok" if ok else "gg wrong"] += 1

    threads = [threading.Thread(target=infer_loop), threading.Thread(target=gg_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    CASES["threads: shared-model calls"] += sum(counts.values())
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert counts == {"infer ok": 12, "gg ok": 30}
    assert all(m.mode == "task" and m.task_id == 3 for m in convert.masked_layers(model))


def test_a_foreign_mode_change_or_forward_during_a_call_is_refused():
    model = make_model(tasks=3)
    x = rows_of(3)
    inside, release = threading.Event(), threading.Event()

    def slow_objective(logits):  # holds the model inside alpha_gradients until released
        inside.set()
        release.wait(30)
        return inference.entropy_rows(logits)

    result = {}

    def worker():
        result["g"] = inference.alpha_gradients(model, x, torch.full((3,), 1 / 3), objective=slow_objective)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert inside.wait(30)
        with pytest.raises(SupsupError, match="in use by another thread"):
            convert.set_task(model, 1)
        with pytest.raises(SupsupError, match="in use by another thread"):
            convert.set_superposition(model)
        with pytest.raises(SupsupError, match="in use by another thread"):
            model(x)
    finally:
        release.set()
        t.join(30)
    want = inference.alpha_gradients(model, x, torch.full((3,), 1 / 3))
    torch.testing.assert_close(result["g"], want.float(), rtol=1e-6, atol=1e-9)
    convert.set_task(model, 1)  # free again once the call has returned
    model(x)
    CASES["threads: foreign changes refused"] += 3
