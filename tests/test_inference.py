"""Task inference (GN): one-shot, binary search and gradient descent against an explicit float
superposition, per-example inference against per-row batch inference, objectives, memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from supsup_fast import convert, format, inference, objectives, reference
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import SupsupError
from supsup_fast.nn import MaskedLayerBase, MaskedLinear, TaskBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# Random SupSup networks with random stored masks
# --------------------------------------------------------------------------------------
def mlp(dims, seed, binariser="threshold", inplace=False, density=0.5):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=inplace))
    model = nn.Sequential(*layers)
    return convert.convert_(model, SupsupConfig(binariser=binariser, density=density, seed=seed))


def convnet(seed, bn=False):
    mods = [nn.Conv2d(2, 4, 3, padding=1, stride=1)]
    if bn:
        mods.append(nn.BatchNorm2d(4))
    mods += [nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, stride=2, groups=2, dilation=1), nn.ReLU(), nn.Flatten(),
             nn.Linear(4 * 2 * 2, 7)]
    return convert.convert_(nn.Sequential(*mods), SupsupConfig(binariser="threshold", seed=seed))


def store_random_tasks(model, t, x_stats=None, seed=0):
    """Freeze ``t`` tasks whose masks come from fresh random scores (and BN statistics from ``x_stats``)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(t):
        convert.begin_task(model)
        for p in convert.task_parameters(model):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen))
        if x_stats is not None:
            model.train()
            with torch.no_grad():
                model(x_stats + torch.randn(x_stats.shape, generator=gen))
        convert.freeze_task(model)
    model.eval()
    return model


def explicit_forward(model, x, alpha):
    """The superposed network in plain torch: ``W * sum_t alpha_t M_t`` from unpacked float masks."""
    h = x
    for m in model:
        if isinstance(m, MaskedLayerBase):
            masks = format.unpack(m.bank, m.weight.shape, torch.float32)  # [T, *W.shape]
            w_eff = m.weight * torch.einsum("t,t...->...", alpha, masks)
            if isinstance(m, MaskedLinear):
                h = F.linear(h, w_eff, m.bias)
            else:
                h = F.conv2d(h, w_eff, m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, TaskBatchNorm):
            mean = alpha @ m.running_mean
            var = (alpha @ (m.running_var + m.running_mean.square()) - mean.square()).clamp_min(0)
            shape = (1, -1) + (1,) * (h.dim() - 2)
            h = (h - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
        else:
            h = m(h)
    return h


def explicit_grad(model, x, alpha, objective, num_real=None):
    a = alpha.clone().requires_grad_(True)
    logits = explicit_forward(model, x, a)
    obj = reference.entropy(logits) if objective == "entropy" else reference.g_objective(logits, num_real)
    (g,) = torch.autograd.grad(obj, a)
    return g


def explicit_binary(model, x, cands, objective, num_real=None):
    """The halving procedure, written out: keep the ceil(n/2) lowest (ties: lower id) until one is left."""
    t = convert.num_tasks(model)
    alive = sorted(cands)
    passes = 0
    while len(alive) > 1:
        alpha = torch.zeros(t)
        alpha[alive] = 1.0 / len(alive)
        g = explicit_grad(model, x, alpha, objective, num_real)
        passes += 1
        ranked = sorted(alive, key=lambda i: (float(g[i]), i))
        alive = sorted(ranked[: (len(alive) + 1) // 2])
    return alive[0], passes


def uniform(t, cands=None):
    a = torch.zeros(t)
    cands = list(range(t)) if cands is None else cands
    a[cands] = 1.0 / len(cands)
    return a


# --------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------
def test_objectives_match_reference_means():
    z = torch.randn(9, 13) * 3
    torch.testing.assert_close(inference.entropy_rows(z).mean(), reference.entropy(z))
    torch.testing.assert_close(inference.g_rows(z, 4).mean(), reference.g_objective(z, 4))


def test_margin_is_the_top_logit_minus_the_runner_up():
    z = torch.randn(9, 13) * 3
    z[2, 4] = z[2, 7] = 50.0  # a tie at the top: margin 0
    top = z.sort(-1, descending=True).values
    torch.testing.assert_close(objectives.margin_rows(z), top[:, 0] - top[:, 1])
    assert float(objectives.margin_rows(z)[2]) == 0.0
    torch.testing.assert_close(objectives.score_rows("margin")(z), top[:, 1] - top[:, 0])  # lower is better
    assert objectives.score_rows("entropy") is inference.entropy_rows
    assert objectives.score_rows("auto", one_row=True) is inference.entropy_rows
    torch.testing.assert_close(objectives.score_rows("auto")(z), top[:, 1] - top[:, 0])
    with pytest.raises(SupsupError, match="at least 2 outputs"):
        objectives.margin_rows(torch.randn(3, 1))
    with pytest.raises(SupsupError, match="unknown shortlist score"):
        objectives.score_rows("nope")


def test_g_objective_gradient_is_softmax_on_superfluous_and_zero_on_real():
    z = (torch.randn(6, 12) * 2).requires_grad_(True)
    num_real = 5
    (g,) = torch.autograd.grad(inference.g_rows(z, num_real).sum(), z)
    assert torch.equal(g[:, :num_real], torch.zeros(6, num_real))
    torch.testing.assert_close(g[:, num_real:], torch.softmax(z.detach(), -1)[:, num_real:])


def test_g_objective_needs_superfluous_neurons():
    model = store_random_tasks(mlp([5, 6, 4], 0), 2)
    with pytest.raises(SupsupError, match="superfluous"):
        inference.infer_task(model, torch.randn(3, 5), objective="g", num_real=4)
    with pytest.raises(SupsupError, match="num_real"):
        inference.infer_task(model, torch.randn(3, 5), objective="g")


# --------------------------------------------------------------------------------------
# One-shot and binary search against the explicit float superposition
# --------------------------------------------------------------------------------------
CASES = [(seed, obj) for seed in range(6) for obj in ("entropy", "g")]


@pytest.mark.parametrize("seed,objective", CASES)
def test_one_shot_gradient_and_argmin_match_explicit_superposition(seed, objective):
    gen = torch.Generator().manual_seed(seed)
    dims = [int(d) for d in torch.randint(3, 40, (4,), generator=gen)]
    dims[-1] = max(dims[-1], 6)
    t = int(torch.randint(2, 12, (1,), generator=gen))
    model = store_random_tasks(mlp(dims, seed), t, seed=seed)
    x = torch.randn(int(torch.randint(1, 9, (1,), generator=gen)), dims[0], generator=gen)
    num_real = 3 if objective == "g" else None
    rows = None if seed % 2 else 1
    want = explicit_grad(model, x if rows is None else x[:rows], uniform(t), objective, num_real)
    got = inference.alpha_gradients(model, x if rows is None else x[:rows], uniform(t), objective=objective,
                                    num_real=num_real)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    res = inference.infer_task(model, x, objective=objective, num_real=num_real, rows=rows)
    assert res.task_ids.shape == (1,) and res.passes == 1
    assert float(want[res.task_ids[0]]) <= float(want.min()) + 1e-6 * (1 + float(want.abs().max()))
    torch.testing.assert_close(res.grads[0][0], want, rtol=1e-4, atol=1e-6)
    nu = torch.softmax(-want, 0)
    torch.testing.assert_close(res.confidence, nu.max().reshape(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_one_shot_on_conv_net_with_task_batchnorm_matches_explicit(seed):
    torch.manual_seed(seed)
    model = store_random_tasks(convnet(seed, bn=True), 5, x_stats=torch.randn(16, 2, 5, 5), seed=seed)
    x = torch.randn(4, 2, 5, 5)
    want = explicit_grad(model, x, uniform(5), "entropy")
    got = inference.alpha_gradients(model, x, uniform(5))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed,objective", [(s, o) for s in range(5) for o in ("entropy", "g")])
def test_binary_search_matches_explicit_halving(seed, objective):
    gen = torch.Generator().manual_seed(100 + seed)
    t = int(torch.randint(2, 14, (1,), generator=gen))
    model = store_random_tasks(mlp([12, 17, 9], seed), t, seed=seed)
    x = torch.randn(5, 12, generator=gen)
    num_real = 4 if objective == "g" else None
    cands = list(range(t)) if seed % 2 == 0 else sorted(torch.randperm(t, generator=gen)[: max(1, t // 2 + 1)].tolist())
    want, passes = explicit_binary(model, x, cands, objective, num_real)
    res = inference.infer_task(model, x, method="binary", objective=objective, num_real=num_real, rows=None,
                               candidates=cands)
    assert int(res.task_ids[0]) == want
    assert res.passes == passes == math.ceil(math.log2(len(cands)))
    assert 0.0 <= float(res.confidence[0]) <= 1.0


def test_binary_search_ties_go_to_lower_task_id():
    model = store_random_tasks(mlp([6, 5, 4], 0), 4)
    # every task stores the same mask, so every gradient ties
    for m in model:
        if isinstance(m, MaskedLayerBase):
            m.bank = m.bank[[0, 0, 0, 0]].clone()
    x = torch.randn(3, 6)
    res = inference.infer_task(model, x, method="binary", rows=None)
    assert int(res.task_ids[0]) == 0
    res = inference.infer_task(model, x, method="binary", rows=None, candidates=[3, 1, 2])
    assert int(res.task_ids[0]) == 1


def test_gradient_descent_steps_follow_softmax_chain_rule():
    torch.manual_seed(0)
    model = store_random_tasks(mlp([8, 10, 6], 3), 4, seed=3)
    x = torch.randn(6, 8)
    res = inference.infer_task(model, x, method="gradient_descent", rows=None, lr=0.5, threshold=0.9, max_steps=6)
    theta = torch.zeros(4)
    for alpha, g in zip(res.alphas, res.grads):
        torch.testing.assert_close(alpha[0], torch.softmax(theta, 0))
        torch.testing.assert_close(g[0], explicit_grad(model, x, torch.softmax(theta, 0), "entropy"),
                                   rtol=1e-4, atol=1e-6)
        a = torch.softmax(theta, 0)
        d = a * (g[0] - (a * g[0]).sum())
        theta = theta - 0.5 * d / d.abs().max()
    final = torch.softmax(theta, 0)
    assert int(res.task_ids[0]) == int(final.argmax())
    torch.testing.assert_close(res.confidence[0], final.max())
    assert res.passes == len(res.grads) <= 6


# --------------------------------------------------------------------------------------
# Shortlist: the gradient narrows, each survivor's own forward pass decides
# --------------------------------------------------------------------------------------
def own_mask_scores(model, x, tasks, score="entropy"):
    """Each task's mean score over the rows of ``x`` under its own mask, one plain forward per task: the
    output entropy, or the negated gap between the two largest logits (``score="margin"``)."""
    out = []
    for t in tasks:
        convert.set_task(model, t)
        with torch.no_grad():
            z = model(x)
        if score == "entropy":
            out.append(float(reference.entropy(z)))
        else:
            top = z.sort(-1, descending=True).values
            out.append(float((top[:, 1] - top[:, 0]).mean()))
    return out


@pytest.mark.parametrize("seed,objective,score", [(s, o, "entropy") for s in range(4) for o in ("entropy", "g")]
                         + [(s, "g", "margin") for s in range(4)])
def test_shortlist_of_every_task_picks_the_lowest_own_mask_score(seed, objective, score):
    gen = torch.Generator().manual_seed(300 + seed)
    t = int(torch.randint(2, 10, (1,), generator=gen))
    model = store_random_tasks(mlp([10, 15, 13, 9], seed), t, seed=seed)
    x = torch.randn(6, 10, generator=gen) * 2
    num_real = 4 if objective == "g" else None
    want = own_mask_scores(model, x, range(t), score)  # whatever objective the gradient would use
    res = inference.infer_task(model, x, method="shortlist", shortlist=t, objective=objective, num_real=num_real,
                               rows=None, shortlist_score=score)
    assert res.passes == 0 and res.candidates.tolist() == [list(range(t))]  # no gradient pass needed
    torch.testing.assert_close(res.scores[0].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert int(res.task_ids[0]) == min(range(t), key=lambda i: (want[i], i))
    n_conf = torch.softmax(-6 * torch.tensor(want, dtype=torch.float64), 0).max()
    torch.testing.assert_close(res.confidence[0].double(), n_conf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed,score", [(s, sc) for s in range(4) for sc in ("entropy", "margin")])
def test_shortlist_scores_the_survivors_of_binary_search_or_one_shot(seed, score):
    gen = torch.Generator().manual_seed(400 + seed)
    t, size = 11, 3
    model = store_random_tasks(mlp([12, 17, 9], seed), t, seed=seed)
    x = torch.randn(5, 12, generator=gen)
    # binary: halve (keep ceil(n/2), ties to the lower id) until at most `size` remain: 11 -> 6 -> 3
    alive = list(range(t))
    while len(alive) > size:
        g = explicit_grad(model, x, uniform(t, alive), "entropy")
        alive = sorted(sorted(alive, key=lambda i: (float(g[i]), i))[: (len(alive) + 1) // 2])
    res = inference.infer_task(model, x, method="shortlist", shortlist=size, shortlist_by="binary", rows=None,
                               shortlist_score=score)
    assert res.passes == 2 and res.candidates.tolist() == [alive]
    scores = own_mask_scores(model, x, alive, score)
    assert int(res.task_ids[0]) == alive[min(range(len(alive)), key=lambda i: (scores[i], i))]
    # one-shot: the `size` lowest gradients of one pass at alpha uniform
    g = explicit_grad(model, x, uniform(t), "entropy")
    lowest = sorted(sorted(range(t), key=lambda i: (float(g[i]), i))[:size])
    res = inference.infer_task(model, x, method="shortlist", shortlist=size, shortlist_by="one_shot", rows=None,
                               shortlist_score=score)
    assert res.passes == 1 and res.candidates.tolist() == [lowest]
    scores = own_mask_scores(model, x, lowest, score)
    assert int(res.task_ids[0]) == lowest[min(range(size), key=lambda i: (scores[i], i))]


@pytest.mark.parametrize("seed", range(3))
def test_shortlist_score_auto_is_the_margin_over_rows_and_the_entropy_of_one_row(seed):
    gen = torch.Generator().manual_seed(700 + seed)
    model = store_random_tasks(mlp([12, 17, 9], seed), 7, seed=seed)
    x = torch.randn(10, 12, generator=gen) * 2
    cases = (("batch", None, "margin"), ("batch", 1, "entropy"), ("per_example", 1, "entropy"))
    for batch_mode, rows, same_as in cases:
        kw = dict(method="shortlist", shortlist=7, rows=rows, batch_mode=batch_mode)
        auto = inference.infer_task(model, x, **kw)
        want = inference.infer_task(model, x, shortlist_score=same_as, **kw)
        assert torch.equal(auto.scores, want.scores) and torch.equal(auto.task_ids, want.task_ids)
    # the two scores rank differently here, so the test above can tell them apart
    kw = dict(method="shortlist", shortlist=7, rows=None, batch_mode="per_example")
    assert not torch.equal(inference.infer_task(model, x, shortlist_score="margin", **kw).scores,
                           inference.infer_task(model, x, shortlist_score="entropy", **kw).scores)


@pytest.mark.parametrize("seed_format", [1, 2])
def test_shortlist_is_right_on_rotated_mnist_where_the_uniform_alpha_gradient_is_not(seed_format):
    """Three RotatedMNIST-5k tasks 10 degrees apart (masks that look alike), a small net trained 200
    steps per task: over the 24 class-mixed test batches of 128, the candidates' own networks pick the
    right rotation for all but at most one (24 of 24 over the format-1 base, 23 over format 2's);
    one-shot and binary search, ranking by the gradient at a uniform superposition, for fewer."""
    from supsup_fast import data, training
    from supsup_fast.experiment import eval_batches

    bench = data.RotatedMNIST(data.mnist_5k(), 3)
    torch.manual_seed(0)
    model = convert.convert_(nn.Sequential(nn.Flatten(), nn.Linear(784, 128, bias=False), nn.ReLU(),
                                           nn.Linear(128, 128, bias=False), nn.ReLU(), nn.Linear(128, 30, bias=False)),
                             SupsupConfig(binariser="threshold", seed=0, seed_format=seed_format))
    for t in range(3):
        training.fit_task(model, bench.infinite_batches(t, 128, seed=0), iterations=200, optimizer="rmsprop", lr=1e-3,
                          progress=False)
    model.eval()
    hits, batches = {"one_shot": 0, "binary": 0, "shortlist": 0}, 0
    for t in range(3):
        for positions in eval_batches(bench.split_size(t, "test"), 1000, 128, t):
            x, _ = bench.batch(t, "test", positions)
            batches += 1
            for method in hits:
                hits[method] += int(inference.infer_task(model, x, method=method, rows=None).task_ids[0]) == t
    assert batches == 24
    assert hits["shortlist"] >= batches - 1, hits
    assert hits["shortlist"] > max(hits["one_shot"], hits["binary"]), hits


@pytest.mark.parametrize("seed,score", [(s, "entropy") for s in range(3)] + [(s, "margin") for s in range(3)])
def test_shortlist_by_rows_narrows_on_the_first_rows_and_decides_on_all(seed, score):
    gen = torch.Generator().manual_seed(500 + seed)
    t, size, first = 9, 3, 4
    model = store_random_tasks(mlp([12, 17, 9], seed), t, seed=seed)
    x = torch.randn(10, 12, generator=gen) * 2
    pre = own_mask_scores(model, x[:first], range(t), score)
    kept = sorted(sorted(range(t), key=lambda i: (pre[i], i))[:size])
    for by in ("rows", "auto"):  # auto is rows in batch mode
        res = inference.infer_task(model, x, method="shortlist", shortlist=size, shortlist_by=by, shortlist_rows=first,
                                   rows=None, shortlist_score=score)
        assert res.passes == 0 and res.candidates.tolist() == [kept]
        final = own_mask_scores(model, x, kept, score)
        torch.testing.assert_close(res.scores[0].double(), torch.tensor(final, dtype=torch.float64), rtol=1e-4,
                                   atol=1e-5)
        assert int(res.task_ids[0]) == kept[min(range(size), key=lambda i: (final[i], i))]
    # per example there are no other rows to narrow on: every candidate is scored on the row itself
    res = inference.infer_task(model, x[:3], method="shortlist", shortlist=size, shortlist_by="rows",
                               batch_mode="per_example", shortlist_score=score)
    assert res.candidates.tolist() == [list(range(t))] * 3
    for r in range(3):
        own = own_mask_scores(model, x[r:r + 1], range(t), score)
        assert int(res.task_ids[r]) == min(range(t), key=lambda i: (own[i], i))


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_forward_rows_through_tasks_equals_each_rows_own_task(kind):
    torch.manual_seed(5)
    if kind == "conv_bn":
        model = store_random_tasks(convnet(5, bn=True), 4, x_stats=torch.randn(16, 2, 5, 5))
        x = torch.randn(9, 2, 5, 5)
    else:
        model = store_random_tasks(mlp([10, 16, 12, 8], 5), 4)
        x = torch.randn(9, 10)
    convert.set_task(model, 2)
    ids = torch.tensor([3, 0, 0, 1, 3, 2, 1, 0, 3])
    with torch.no_grad():
        got = inference.forward_rows_through_tasks(model, x, ids)
    for r in range(9):
        convert.set_task(model, int(ids[r]))
        with torch.no_grad():
            torch.testing.assert_close(got[r], model(x[r:r + 1])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(SupsupError, match="one entry per row"):
        inference.forward_rows_through_tasks(model, x, ids[:3])


def test_shortlist_arguments_are_checked():
    model = store_random_tasks(mlp([4, 5, 3], 0), 3)
    with pytest.raises(SupsupError, match="shortlist must"):
        inference.infer_task(model, torch.randn(2, 4), method="shortlist", shortlist=0)
    with pytest.raises(SupsupError, match="shortlist_by"):
        inference.infer_task(model, torch.randn(2, 4), method="shortlist", shortlist_by="nope")
    with pytest.raises(SupsupError, match="shortlist_rows"):
        inference.infer_task(model, torch.randn(2, 4), method="shortlist", shortlist_rows=0)
    with pytest.raises(SupsupError, match="unknown shortlist score"):
        inference.infer_task(model, torch.randn(2, 4), method="shortlist", shortlist_score="nope")


# --------------------------------------------------------------------------------------
# Per-example inference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "mlp_inplace", "conv_bn"])
def test_per_example_gradients_equal_single_row_gradients(kind):
    torch.manual_seed(1)
    if kind == "conv_bn":
        model = store_random_tasks(convnet(1, bn=True), 6, x_stats=torch.randn(16, 2, 5, 5))
        x = torch.randn(7, 2, 5, 5)
    else:
        model = store_random_tasks(mlp([10, 16, 12, 8], 1, inplace=kind == "mlp_inplace"), 6)
        x = torch.randn(7, 10)
    alpha = torch.softmax(torch.randn(6), 0)
    per_row = inference.alpha_gradients(model, x, alpha, per_example=True, chunk_elements=300)
    assert per_row.shape == (7, 6)
    for r in range(7):
        want = explicit_grad(model, x[r:r + 1], alpha, "entropy")
        torch.testing.assert_close(per_row[r], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(per_row[r], inference.alpha_gradients(model, x[r:r + 1], alpha),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["one_shot", "binary", "gradient_descent", "shortlist:one_shot", "shortlist:binary",
                                    "shortlist:rows"])
@pytest.mark.parametrize("objective", ["entropy", "g"])
def test_per_example_inference_equals_batch_inference_on_each_row(method, objective):
    torch.manual_seed(2)
    model = store_random_tasks(mlp([9, 14, 11], 2), 7)
    x = torch.randn(6, 9) * 2
    method, _, by = method.partition(":")
    kw = dict(method=method, objective=objective, num_real=5 if objective == "g" else None,
              candidates=[0, 2, 3, 5, 6], max_steps=8, threshold=0.7, lr=0.7, shortlist=2, shortlist_by=by or "auto")
    res = inference.infer_task(model, x, batch_mode="per_example", **kw)
    assert res.task_ids.shape == (6,) and res.confidence.shape == (6,)
    for r in range(6):
        one = inference.infer_task(model, x[r:r + 1], batch_mode="batch", rows=1, **kw)
        assert int(res.task_ids[r]) == int(one.task_ids[0])
        torch.testing.assert_close(res.confidence[r], one.confidence[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Candidates, confidence, state
# --------------------------------------------------------------------------------------
def test_only_learned_tasks_are_candidates_and_confidence_is_a_probability():
    torch.manual_seed(3)
    model = store_random_tasks(mlp([8, 12, 6], 4), 5)
    convert.begin_task(model)  # task 5 is open: it must never be chosen
    x = torch.randn(20, 8) * 3
    for method in ("one_shot", "binary", "gradient_descent", "shortlist"):
        res = inference.infer_task(model, x, method=method, batch_mode="per_example", max_steps=3)
        assert ((res.task_ids >= 0) & (res.task_ids < 5)).all()
        assert ((res.confidence >= 0) & (res.confidence <= 1)).all()
        res = inference.infer_task(model, x, method=method, batch_mode="per_example", candidates=[1, 4], max_steps=3)
        assert set(res.task_ids.tolist()) <= {1, 4}
        assert (res.confidence >= 0.5 - 1e-6).all()
    with pytest.raises(SupsupError, match="candidates"):
        inference.infer_task(model, x, candidates=[5])
    with pytest.raises(SupsupError, match="candidates"):
        inference.infer_task(model, x, candidates=[])
    assert all(m.mode == "train" and m.task_id == 5 for m in convert.masked_layers(model))


def test_inference_restores_the_model_mode_and_needs_a_learned_task():
    model = mlp([4, 5, 3], 0)
    with pytest.raises(SupsupError, match="learned"):
        inference.infer_task(model, torch.randn(2, 4))
    store_random_tasks(model, 3)
    convert.set_task(model, 1)
    inference.infer_task(model, torch.randn(2, 4), method="binary", batch_mode="per_example")
    assert all(m.mode == "task" and m.task_id == 1 and m.alpha is None for m in convert.masked_layers(model))
    with pytest.raises(SupsupError, match="method"):
        inference.infer_task(model, torch.randn(2, 4), method="nope")
    with pytest.raises(SupsupError, match="batch_mode"):
        inference.infer_task(model, torch.randn(2, 4), batch_mode="nope")
    with pytest.raises(SupsupError, match="objective"):
        inference.infer_task(model, torch.randn(2, 4), objective="nope")


def test_single_candidate_needs_no_pass():
    model = store_random_tasks(mlp([4, 5, 3], 0), 3)
    res = inference.infer_task(model, torch.randn(2, 4), method="binary", candidates=[2])
    assert res.passes == 0 and int(res.task_ids[0]) == 2 and float(res.confidence[0]) == 1.0


# --------------------------------------------------------------------------------------
# Prediction and GN scoring
# --------------------------------------------------------------------------------------
def test_predict_uses_the_inferred_task_per_row():
    torch.manual_seed(4)
    model = store_random_tasks(mlp([8, 12, 9], 5), 4)
    x = torch.randn(10, 8) * 2
    ids, classes = inference.predict(model, x, batch_mode="per_example")
    want_ids = inference.infer_task(model, x, batch_mode="per_example").task_ids
    assert torch.equal(ids, want_ids)
    for r in range(10):
        convert.set_task(model, int(ids[r]))
        with torch.no_grad():
            assert int(model(x[r:r + 1]).argmax(-1)) == int(classes[r])
    ids, classes = inference.predict(model, x, rows=3)
    assert ids.shape == (10,) and (ids == ids[0]).all()
    convert.set_task(model, int(ids[0]))
    with torch.no_grad():
        assert torch.equal(model(x).argmax(-1), classes)


def test_gnu_and_gns_scoring():
    tp = torch.tensor([0, 1, 1, 2])
    cp = torch.tensor([3, 3, 4, 5])
    assert inference.gnu_correct(tp, cp, 1, torch.tensor([3, 3, 4, 5])).tolist() == [False, True, True, False]
    assert inference.gns_correct(cp, torch.tensor([3, 0, 4, 5])).tolist() == [True, False, True, True]
    model = store_random_tasks(mlp([6, 7, 5], 2), 3)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    ids, classes = inference.predict(model, x, batch_mode="per_example")
    got = inference.evaluate_inference(model, [(x, y)], task=1, batch_mode="per_example")
    assert got["count"] == 8
    assert got["accuracy"] == pytest.approx(float(((ids == 1) & (classes == y)).float().mean()))
    assert got["task_accuracy"] == pytest.approx(float((ids == 1).float().mean()))
    gns = inference.evaluate_inference(model, [(x, y, torch.full((8,), 1))], scenario="GNs", batch_mode="per_example")
    assert gns["accuracy"] == pytest.approx(float((classes == y).float().mean()))


# --------------------------------------------------------------------------------------
# Memory: never a float [T, N, K] mask stack
# --------------------------------------------------------------------------------------
class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_float = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.max_float = max(self.max_float, t.numel())
        return out


@pytest.mark.parametrize("method", ["one_shot", "binary", "gradient_descent", "shortlist"])
@pytest.mark.parametrize("batch_mode", ["batch", "per_example"])
def test_no_float_tensor_as_large_as_a_mask_stack(method, batch_mode):
    t = 48
    model = store_random_tasks(mlp([20, 30, 20, 10], 6), t)
    bound = min(t * m.weight.numel() for m in convert.masked_layers(model))
    x = torch.randn(4, 20)
    mode = _MaxNumel()
    with mode:
        inference.infer_task(model, x, method=method, batch_mode=batch_mode, rows=None, max_steps=3,
                             chunk_elements=1200)
    assert 0 < mode.max_float < bound
