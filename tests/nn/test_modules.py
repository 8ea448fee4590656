"""Masked layers, per-task BatchNorm and binarisers against explicit float-mask PyTorch."""

import math

import pytest
import torch
import torch.nn.functional as F

from supsup_fast import SupsupError, format, ops, reference, testing
from supsup_fast._native import EXT_LOADED
from supsup_fast.binarise import binarise, binarise_words, kept_count, straight_through_sign, threshold_mask, topk_mask
from supsup_fast.config import SupsupConfig
from supsup_fast.nn import MaskedConv2d, MaskedLinear, TaskBatchNorm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_and_freeze(layer, n_tasks, scale=1.0):
    """Open and freeze ``n_tasks`` tasks with random scores; returns the float masks frozen."""
    masks = []
    for _ in range(n_tasks):
        layer.begin_task()
        with torch.no_grad():
            layer.scores.normal_(0, scale)
        masks.append(layer.current_mask().clone())
        layer.freeze_task()
    return masks


def _hard_topk(scores, density):
    k = kept_count(scores.numel(), density)
    flat = scores.abs().flatten()
    order = flat.argsort(descending=True)
    m = torch.zeros_like(flat)
    m[order[:k]] = 1
    return m.view_as(scores)


# ------------------------------------------------------------------------------------------
# binarisers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel,density", [(1, 0.3), (10, 0.5), (37, 0.05), (1000, 0.999), (64, 1.0)])
def test_kept_count_matches_edge_popup(numel, density):
    k = kept_count(numel, density)
    assert k == numel - int((1 - density) * numel)
    assert 1 <= k <= numel


@pytest.mark.parametrize("shape,density", [((7, 13), 0.5), ((4, 3, 3, 3), 0.1), ((1, 5), 0.99)])
def test_topk_mask_keeps_largest_magnitudes(shape, density):
    s = torch.randn(shape, dtype=torch.float64)
    m = topk_mask(s, density)
    assert m.dtype == s.dtype and m.shape == s.shape
    torch.testing.assert_close(m, _hard_topk(s, density), rtol=0, atol=0)
    kept, dropped = s.abs()[m.bool()], s.abs()[~m.bool()]
    if dropped.numel():
        assert kept.min() > dropped.max()


CPU_BACKENDS = ["reference"] + (["cpu_ext"] if EXT_LOADED else [])
needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 777, 1 << 16, (1 << 17) - 3])
def test_large_topk_selection_matches_torch_topk(backend, k):
    """On continuous values the selection is exactly torch.topk's set; with ties, k entries of the largest."""
    a = torch.randn(1 << 17, generator=torch.Generator().manual_seed(k)).abs()
    want = torch.zeros(a.numel(), dtype=torch.bool)
    want[torch.topk(a, k).indices] = True
    ties = torch.randint(0, 7, (1 << 17,), generator=torch.Generator().manual_seed(0)).float()
    with ops.force_backend(f"largest_k={backend}"):
        assert torch.equal(ops.largest_k(a, k), want)
        got = ops.largest_k(ties, k)
    assert int(got.sum()) == k and ties[got].min() >= ties[~got].max()


@needs_ext
@pytest.mark.parametrize("magnitude", [True, False])
def test_compiled_selection_is_the_reference_spec(magnitude):
    """The compiled radix select picks the reference's set bit for bit: IEEE total order (NaN above
    inf, -0 below +0 unless by magnitude), ties at the k-th value in index order."""
    gen = torch.Generator().manual_seed(5)
    a = (torch.randint(-3, 4, (70_001,), generator=gen).float() * 0.5)
    a[::97] = float("nan")
    a[1::89] = -float("nan")
    a[2::83] = float("inf")
    a[3::79] = -0.0
    for k in (0, 1, 33_333, 70_000, 70_001):
        with ops.force_backend("largest_k=reference"):
            want = ops.largest_k(a, k, magnitude)
        with ops.force_backend("largest_k=cpu_ext"):
            got = ops.largest_k(a, k, magnitude)
        assert torch.equal(got, want), k


@needs_ext
def test_compiled_topk_selection_ignores_thread_count():
    """Ties at the k-th value are taken in index order across chunks, whatever the thread count."""

    def native(a, k, magnitude):
        with ops.force_backend("largest_k=cpu_ext"):
            return ops.largest_k(a, k, magnitude)

    ties = torch.randint(0, 5, (200_003,), generator=torch.Generator().manual_seed(1)).float() - 2
    threads = torch.get_num_threads()
    try:
        picks = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            picks.append(native(ties, 77_777, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(picks[0], picks[1]) and int(picks[0].sum()) == 77_777
    kept, dropped = ties.abs()[picks[0]], ties.abs()[~picks[0]]
    assert kept.min() >= dropped.max()
    edge = kept.min()
    # among the entries equal to the k-th value, the first ones in index order are the kept ones
    at_edge = (ties.abs() == edge).nonzero().flatten()
    taken = picks[0][at_edge]
    assert bool(taken[: int(taken.sum())].all())


def test_topk_gradient_is_sign_of_scores():
    s = torch.randn(9, 11, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 11, dtype=torch.float64)
    (topk_mask(s, 0.4) * g).sum().backward()
    torch.testing.assert_close(s.grad, g * s.detach().sign(), rtol=0, atol=0)


@pytest.mark.parametrize("binariser", ["topk", "threshold"])
@pytest.mark.parametrize("native", [True, False], ids=["automatic", "reference"])
@pytest.mark.parametrize("shape", [(37, 53), (300, 784), (6, 5, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarise_words_matches_float_binariser(binariser, native, shape, dtype):
    """Packed words + score_sign give the same mask and the same score gradient as the float
    binariser, with the compiled selection and fused sign epilogue and with the PyTorch fallbacks."""
    forced = None if native else "largest_k=reference,topk_words=reference,threshold_words=reference," \
                                 "masked_weight_grad_sign=reference"
    with ops.force_backend(forced):
        _check_binarise_words(binariser, shape, dtype)


def _check_binarise_words(binariser, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0])
    s = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    n, k = shape[0], s[0].numel()
    x, w = torch.randn(5, k, generator=gen, dtype=dtype), torch.randn(n, k, generator=gen, dtype=dtype)
    g = torch.randn(5, n, generator=gen, dtype=dtype)
    words = binarise_words(s, binariser, 0.37)
    want = binarise(s.detach(), binariser, 0.37)
    assert words.dtype == torch.int32 and torch.equal(ops.unpack_masks(words, k, dtype).reshape(shape), want)
    sign = straight_through_sign(binariser)
    (ops.masked_linear(x, w, words, scores=s.reshape(n, k), score_sign=sign) * g).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    (F.linear(x, w * binarise(s2, binariser, 0.37).reshape(n, k)) * g).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad)
    # the same through apply_mask (the conv layers' path)
    s3 = s.detach().clone().requires_grad_()
    (F.linear(x, ops.apply_mask(w, words, scores=s3.reshape(n, k), score_sign=sign)) * g).sum().backward()
    torch.testing.assert_close(s3.grad, s2.grad)


@pytest.mark.parametrize("sizes", [(64, 64), (300, 784), (1024, 1024), (7, 70_001), (3, 5)])
@pytest.mark.parametrize("density", [0.5, 0.05, 0.97])
@needs_ext
def test_compiled_topk_words_is_the_exact_selection(sizes, density):
    """The sample select picks exactly the radix select's set (ties in index order), packed, on
    continuous, tied, sorted and NaN-holding scores, and whatever the thread count; and that set
    is the reference's."""

    def native(s, keep):
        with ops.force_backend("topk_words=cpu_ext"):
            return ops.topk_words(s, keep)

    n, k = sizes
    gen = torch.Generator().manual_seed(n * 7 + k)
    cases = {
        "uniform": torch.rand(n, k, generator=gen) * 2 - 1,
        "ties": (torch.randint(0, 5, (n, k), generator=gen) - 2).float(),
        "sorted": torch.linspace(-1, 1, n * k).reshape(n, k),
        "rows": torch.randn(n, k, generator=gen) * torch.arange(1, n + 1).float()[:, None],  # one scale per row
    }
    cases["nan"] = cases["uniform"].clone()
    cases["nan"].view(-1)[:: max(1, n * k // 50)] = float("nan")
    keep = kept_count(n * k, density)
    threads = torch.get_num_threads()
    for name, s in cases.items():
        with ops.force_backend("largest_k=cpu_ext"):
            want = ops.pack_masks(ops.largest_k(s.reshape(-1), keep, True).reshape(n, k))
        with ops.force_backend("topk_words=reference"):
            assert torch.equal(ops.topk_words(s, keep), want), name
        try:
            for t in (1, 2):
                torch.set_num_threads(t)
                assert torch.equal(native(s, keep), want), (name, t)
        finally:
            torch.set_num_threads(threads)
        assert int(ops.unpack_masks(want, k).sum()) == keep


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threshold_words(backend):
    s = torch.randn(37, 101)
    s[0, :4] = torch.tensor([0.0, -0.0, float("nan"), -float("inf")])
    with ops.force_backend(f"threshold_words={backend}"):
        assert torch.equal(ops.threshold_words(s), ops.pack_masks(s >= 0))


def test_signed_score_gradient_twice_differentiable():
    """With score_sign the score gradient stays differentiable under create_graph (the unfused path)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    s = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    s.requires_grad_()
    words = binarise_words(s, "topk", 0.5)
    (gs,) = torch.autograd.grad(ops.masked_linear(x, w, words, scores=s, score_sign=True).square().sum(), s,
                                create_graph=True)
    y = x @ (w * binarise(s.detach(), "topk", 0.5)).t()
    torch.testing.assert_close(gs, ((2 * y).t() @ x) * w * s.detach().sign())
    (gx,) = torch.autograd.grad(gs.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ (w * binarise(s.detach(), "topk", 0.5)).t()
    want = torch.autograd.grad((((2 * y2).t() @ x2) * w * s.detach().sign()).sum(), x2)[0]
    torch.testing.assert_close(gx, want)


def test_threshold_mask_and_unit_gradient():
    s = torch.randn(6, 17, requires_grad=True)
    g = torch.randn(6, 17)
    m = threshold_mask(s)
    torch.testing.assert_close(m, (s >= 0).float(), rtol=0, atol=0)
    (m * g).sum().backward()
    torch.testing.assert_close(s.grad, g, rtol=0, atol=0)


def test_binarise_rejects_bad_inputs():
    with pytest.raises(SupsupError, match="binariser"):
        binarise(torch.randn(3, 3), "sigmoid")
    with pytest.raises(SupsupError, match="density"):
        topk_mask(torch.randn(3, 3), 0.0)
    with pytest.raises(SupsupError, match="floating"):
        threshold_mask(torch.ones(3, 3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------
# frozen tasks == F.linear / F.conv2d with the explicit mask
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(5, 37), (33, 64), (1, 1)])
@pytest.mark.parametrize("binariser", ["topk", "threshold"])
def test_linear_frozen_tasks_match_explicit_mask(dtype, n, k, binariser, device):
    torch.manual_seed(0)
    cfg = SupsupConfig(density=0.3, binariser=binariser, seed=7)
    layer = MaskedLinear(k, n, config=cfg, layer_id=3, dtype=dtype, device=device)
    want_w = reference.signed_constant(7, 3, (n, k), math.sqrt(2), dtype)
    torch.testing.assert_close(layer.weight.cpu(), want_w, rtol=0, atol=0)
    masks = _train_and_freeze(layer, 3)
    x = torch.randn(4, 2, k, dtype=dtype, device=device)
    for t, m in enumerate(masks):
        assert torch.equal(layer.task_mask(t), m.bool())
        layer.set_task(t)
        testing.assert_rel_close(layer(x).cpu(), F.linear(x.double(), (layer.weight * m.to(dtype)).double()), dtype)


CONV_CASES = [
    dict(in_ch=3, out_ch=5, kernel_size=3),
    dict(in_ch=4, out_ch=6, kernel_size=(3, 2), stride=2, padding=1),
    dict(in_ch=4, out_ch=4, kernel_size=3, padding=2, dilation=2),
    dict(in_ch=6, out_ch=9, kernel_size=1, groups=3),
    dict(in_ch=4, out_ch=8, kernel_size=3, stride=(1, 2), padding=(1, 0), groups=4),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_frozen_tasks_match_explicit_mask(case, dtype, device):
    torch.manual_seed(1)
    case = dict(case)
    in_ch, out_ch = case.pop("in_ch"), case.pop("out_ch")
    layer = MaskedConv2d(in_ch, out_ch, config=SupsupConfig(density=0.6), layer_id=11, dtype=dtype, device=device,
                         **case)
    masks = _train_and_freeze(layer, 2)
    x = torch.randn(2, in_ch, 9, 8, dtype=dtype, device=device)
    for t, m in enumerate(masks):
        layer.set_task(t)
        want = F.conv2d(x.double(), (layer.weight * m).double(), None, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
        testing.assert_rel_close(layer(x).cpu(), want, dtype)


# ------------------------------------------------------------------------------------------
# training forward and the straight-through score gradient
# ------------------------------------------------------------------------------------------
def _explicit_ste_mask(s_leaf, binariser, density):
    """An independent straight-through mask: hard forward, d/dS = sign(S) (top-k) or 1 (threshold)."""
    if binariser == "topk":
        hard = _hard_topk(s_leaf.detach(), density)
        return hard + s_leaf.abs() - s_leaf.abs().detach()
    hard = (s_leaf.detach() >= 0).to(s_leaf.dtype)
    return hard + s_leaf - s_leaf.detach()


def _make(kind, cfg, dtype, device="cpu"):
    if kind == "linear":
        layer = MaskedLinear(19, 7, config=cfg, layer_id=2, dtype=dtype, device=device)
        return layer, torch.randn(5, 3, 19, dtype=dtype, device=device)
    layer = MaskedConv2d(4, 6, 3, stride=2, padding=1, groups=2, config=cfg, layer_id=2, dtype=dtype, device=device)
    return layer, torch.randn(2, 4, 7, 6, dtype=dtype, device=device)


def _dense(layer, x, w):
    if isinstance(layer, MaskedLinear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("binariser", ["topk", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_forward_and_ste_gradient(kind, binariser, dtype, device):
    torch.manual_seed(2)
    layer, x = _make(kind, SupsupConfig(density=0.35, binariser=binariser), dtype, device)
    layer.begin_task()
    x = x.requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    # the same in float64 through plain autograd and an explicit straight-through mask
    s = layer.scores.detach().double().requires_grad_()
    x2 = x.detach().double().requires_grad_()
    y2 = _dense(layer, x2, layer.weight.double() * _explicit_ste_mask(s, binariser, 0.35))
    (y2 * g.double()).sum().backward()
    testing.assert_rel_close(y.detach().cpu(), y2, dtype)
    testing.assert_rel_close(layer.scores.grad.cpu(), s.grad, dtype)
    testing.assert_rel_close(x.grad.cpu(), x2.grad, dtype)
    if binariser == "topk":  # the sign convention is visible: flipping S's sign flips its gradient
        assert (layer.scores.grad * s.grad.sign() >= 0).all()


def test_keep_bias_is_frozen_and_applied():
    torch.manual_seed(3)
    lin = torch.nn.Linear(6, 4)
    layer = MaskedLinear.from_module(lin, SupsupConfig(keep_bias=True, base="pretrained"), layer_id=1)
    assert torch.equal(layer.weight, lin.weight.detach()) and torch.equal(layer.bias, lin.bias.detach())
    (m,) = _train_and_freeze(layer, 1)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight.detach() * m, lin.bias.detach()))
    assert list(layer.parameters()) == []
    dropped = MaskedLinear.from_module(lin, SupsupConfig(), layer_id=1)
    assert dropped.bias is None and "weight" not in dropped.state_dict()


# ------------------------------------------------------------------------------------------
# memory: scores only for the task in training, exactly one bit per weight per task
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_only_bits_and_base_remain_after_freezing(kind):
    layer, _ = _make(kind, SupsupConfig(), torch.float32)
    assert list(layer.parameters()) == []
    layer.begin_task()
    assert [p.shape for p in layer.parameters()] == [layer.weight.shape]
    layer.freeze_task()
    _train_and_freeze(layer, 2)
    assert layer.num_tasks == 3 and list(layer.parameters()) == []
    floats = {n: b.numel() for n, b in layer.named_buffers() if b.is_floating_point()}
    assert floats == {"weight": layer.weight.numel(), "base_scale": 1}  # the base and its one value
    n, k = format.gemm_shape(layer.weight.shape)
    assert layer.mask_nbytes() == 3 * n * math.ceil(k / 32) * 4
    sd = layer.state_dict()
    assert set(sd) == {"bank", "base_id"}  # the signed-constant base is regenerated, not saved
    assert sd["bank"].shape == (3, n, math.ceil(k / 32))
    assert sd["bank"].untyped_storage().nbytes() == layer.mask_nbytes()


def test_bank_growth_keeps_every_task():
    torch.manual_seed(4)
    layer = MaskedLinear(40, 3, config=SupsupConfig(binariser="threshold"))
    masks = _train_and_freeze(layer, 11)  # crosses several capacity doublings
    for t, m in enumerate(masks):
        assert torch.equal(layer.task_mask(t), m.bool())
    layer.bank = layer.bank.clone()  # as after .to(device): the growth storage is rebuilt, not reused
    masks += _train_and_freeze(layer, 2)
    assert all(torch.equal(layer.task_mask(t), m.bool()) for t, m in enumerate(masks))


# ------------------------------------------------------------------------------------------
# superposition
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_superposition_one_hot_equals_task_and_alpha_gradient(kind, device):
    torch.manual_seed(5)
    layer, x = _make(kind, SupsupConfig(density=0.5), torch.float64, device)
    masks = _train_and_freeze(layer, 4)
    for t in range(4):
        layer.set_task(t)
        want = layer(x)
        layer.set_superposition(F.one_hot(torch.tensor(t, device=device), 4).double())
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)

    alpha = torch.tensor([0.1, 0.4, 0.0, 0.5], dtype=torch.float64, device=device, requires_grad=True)
    layer.set_superposition(alpha)
    assert layer.alpha is alpha and layer.mode == "superpose"
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    a2 = alpha.detach().clone().requires_grad_()
    y2 = _dense(layer, x, layer.weight * sum(a2[t] * masks[t] for t in range(4)))
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(alpha.grad, a2.grad, rtol=1e-10, atol=1e-10)


def test_superposition_alpha_is_not_registered():
    layer = MaskedLinear(8, 4)
    _train_and_freeze(layer, 2)
    alpha = torch.nn.Parameter(torch.full((2,), 0.5))
    layer.set_superposition(alpha)
    assert list(layer.parameters()) == [] and "alpha" not in layer.state_dict()


# ------------------------------------------------------------------------------------------
# transfer init, reopening a task
# ------------------------------------------------------------------------------------------
def test_transfer_init_is_running_mean_of_frozen_scores():
    torch.manual_seed(6)
    layer = MaskedLinear(10, 6, config=SupsupConfig(score_init="transfer"))
    finals = []
    for _ in range(3):
        layer.begin_task()
        if finals:
            torch.testing.assert_close(layer.scores.detach(), torch.stack(finals).mean(0))
        with torch.no_grad():
            layer.scores.normal_()
        finals.append(layer.scores.detach().clone())
        layer.freeze_task()
    sd = layer.state_dict()
    fresh = MaskedLinear(10, 6, config=SupsupConfig(score_init="transfer"))
    fresh.load_state_dict(sd)
    fresh.begin_task()
    torch.testing.assert_close(fresh.scores.detach(), torch.stack(finals).mean(0))


@pytest.mark.parametrize("binariser", ["topk", "threshold"])
def test_reopened_task_starts_from_its_mask(binariser):
    torch.manual_seed(7)
    layer = MaskedConv2d(3, 5, 3, config=SupsupConfig(binariser=binariser, density=0.3))
    masks = _train_and_freeze(layer, 3)
    assert layer.begin_task(1) == 1
    assert torch.equal(layer.current_mask(), masks[1])
    with torch.no_grad():
        layer.scores.neg_()
    new = layer.current_mask().clone()
    assert layer.freeze_task() == 1 and layer.num_tasks == 3
    assert torch.equal(layer.task_mask(1), new.bool())
    assert torch.equal(layer.task_mask(0), masks[0].bool()) and torch.equal(layer.task_mask(2), masks[2].bool())


# ------------------------------------------------------------------------------------------
# per-task BatchNorm
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 5), (8, 5, 7), (4, 5, 3, 6)])
def test_task_batchnorm_keeps_statistics_per_task(shape):
    torch.manual_seed(8)
    bn = TaskBatchNorm(5, momentum=0.5)
    ref = torch.nn.BatchNorm1d(5, affine=False, momentum=0.5) if len(shape) < 4 else \
        torch.nn.BatchNorm2d(5, affine=False, momentum=0.5)
    stats = []
    for t in range(3):
        bn.begin_task()
        bn.train()
        ref.reset_running_stats()
        for _ in range(3):
            x = torch.randn(shape) * (t + 1) + t
            torch.testing.assert_close(bn(x), ref(x))
        bn.eval()
        ref.eval()
        torch.testing.assert_close(bn(x), ref(x))  # eval in "train" mode: the open task's stats
        ref.train()
        stats.append((ref.running_mean.clone(), ref.running_var.clone()))
        assert bn.freeze_task() == t
    assert bn.num_tasks == 3 and bn.task_mean is None
    x = torch.randn(shape)
    bn.train()  # a frozen task is never updated, whatever the training flag
    for t, (mu, var) in enumerate(stats):
        bn.set_task(t)
        torch.testing.assert_close(bn(x), F.batch_norm(x, mu, var, training=False))
        torch.testing.assert_close(bn.running_mean[t], mu)

    alpha = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    bn.set_superposition(alpha)
    y = bn(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    a2 = alpha.detach().clone().requires_grad_()
    mus = torch.stack([s[0] for s in stats])
    vars_ = torch.stack([s[1] for s in stats])
    mean = (a2[:, None] * mus).sum(0)
    var = (a2[:, None] * (vars_ + mus**2)).sum(0) - mean**2
    view = (1, -1) + (1,) * (len(shape) - 2)
    y2 = (x - mean.view(view)) / torch.sqrt(var.view(view) + bn.eps)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(alpha.grad, a2.grad)
    bn.set_superposition(torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(bn(x), F.batch_norm(x, *stats[1], training=False), rtol=1e-5, atol=1e-5)


def test_task_batchnorm_state_dict_resizes_and_keeps_open_task():
    bn = TaskBatchNorm(4)
    for t in range(2):
        bn.begin_task()
        bn(torch.randn(8, 4) + t)
        bn.freeze_task()
    bn.begin_task()
    bn(torch.randn(8, 4))
    fresh = TaskBatchNorm(4)
    fresh.load_state_dict(bn.state_dict())
    assert fresh.num_tasks == 2 and fresh.in_training and fresh.mode == "train"
    for name, b in bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], b)


def test_task_batchnorm_from_pretrained_keeps_frozen_affine():
    src = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        src.weight.uniform_(0.5, 2)
        src.bias.normal_()
    bn = TaskBatchNorm.from_module(src, keep_affine=True)
    assert list(bn.parameters()) == [] and torch.equal(bn.weight, src.weight.detach())
    bn.begin_task()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), src(x))


# ------------------------------------------------------------------------------------------
# state dict
# ------------------------------------------------------------------------------------------
def test_layer_state_dict_round_trip_regenerates_base():
    torch.manual_seed(9)
    cfg = SupsupConfig(seed=123)
    layer = MaskedConv2d(3, 4, 3, padding=1, config=cfg, layer_id=5)
    _train_and_freeze(layer, 3)
    layer.begin_task()  # a checkpoint mid-task keeps the open task's scores
    fresh = MaskedConv2d(3, 4, 3, padding=1, config=cfg, layer_id=5)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.bank, layer.bank)
    assert fresh.in_training and torch.equal(fresh.scores, layer.scores) and fresh.mode == "train"
    layer.freeze_task()
    fresh2 = MaskedConv2d(3, 4, 3, padding=1, config=cfg, layer_id=5)
    fresh2.load_state_dict(layer.state_dict())
    assert fresh2.num_tasks == 4 and fresh2.scores is None and fresh2.mode == "task" and fresh2.task_id == 3
    x = torch.randn(2, 3, 6, 6)
    for t in range(4):
        layer.set_task(t)
        fresh2.set_task(t)
        assert torch.equal(layer(x), fresh2(x))
    # a smaller bank resizes the layer back
    fresh2.load_state_dict(MaskedConv2d(3, 4, 3, padding=1, config=cfg, layer_id=5).state_dict())
    assert fresh2.num_tasks == 0


def test_state_dict_from_another_base_is_rejected():
    layer = MaskedLinear(6, 3, config=SupsupConfig(seed=1), layer_id=2)
    _train_and_freeze(layer, 1)
    with pytest.raises(SupsupError, match="seed, layer_id"):
        MaskedLinear(6, 3, config=SupsupConfig(seed=2), layer_id=2).load_state_dict(layer.state_dict())
    with pytest.raises(SupsupError, match="bank"):
        MaskedLinear(6, 4, config=SupsupConfig(seed=1), layer_id=2).load_state_dict(layer.state_dict())


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density=float("nan")), "density"),
    (dict(binariser="sign"), "binariser"), (dict(base="random"), "base"),
    (dict(density_schedule="erdos_renyi", density=0.8), "Erdős–Rényi"), (dict(max_tasks=0), "max_tasks"),
    (dict(score_init="zeros"), "score_init"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(SupsupError, match=match):
        SupsupConfig(**kwargs)


def test_protocol_errors_name_the_problem():
    layer = MaskedLinear(5, 3, config=SupsupConfig(max_tasks=2))
    with pytest.raises(SupsupError, match="no task selected"):
        layer(torch.randn(2, 5))
    with pytest.raises(SupsupError, match="freeze_task.*without begin_task"):
        layer.freeze_task()
    layer.begin_task()
    with pytest.raises(SupsupError, match="still in training"):
        layer.begin_task()
    layer.freeze_task()
    with pytest.raises(SupsupError, match=r"task id 1 out of range: num_tasks=1"):
        layer.set_task(1)
    with pytest.raises(SupsupError, match=r"task id -1 out of range"):
        layer.set_task(-1)
    with pytest.raises(SupsupError, match="must be an int"):
        layer.set_task(0.0)
    with pytest.raises(SupsupError, match=r"alpha has shape \(2,\), expected \[1\]"):
        layer.set_superposition(torch.ones(2))
    _train_and_freeze(layer, 1)
    with pytest.raises(SupsupError, match="max_tasks=2"):
        layer.begin_task()
    with pytest.raises(SupsupError, match="cannot reopen task 5"):
        layer.begin_task(5)
    with pytest.raises(SupsupError, match="padding"):
        MaskedConv2d(3, 3, 3, padding="same")
    with pytest.raises(SupsupError, match="groups"):
        MaskedConv2d(3, 4, 3, groups=2)
    with pytest.raises(SupsupError, match="pretrained"):
        MaskedLinear(3, 3, config=SupsupConfig(base="pretrained"))
    with pytest.raises(SupsupError, match="bias_value"):
        MaskedLinear(3, 3, bias=True)


def test_set_task_returns_to_the_task_in_training():
    torch.manual_seed(10)
    layer = MaskedLinear(9, 4, config=SupsupConfig(binariser="threshold"))
    (m0,) = _train_and_freeze(layer, 1)
    assert layer.begin_task() == 1
    x = torch.randn(3, 9)
    live = layer(x)
    layer.set_task(0)  # look at a frozen task mid-training ...
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * m0))
    assert layer.in_training
    layer.set_task(1)  # ... and come back to the live scores
    assert layer.mode == "train" and torch.equal(layer(x), live)
