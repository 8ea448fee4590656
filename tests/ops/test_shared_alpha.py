"""``superpose`` at an alpha shared by every task, from the bank's cached per-weight counts
(``supsup_fast/backends/_shared_alpha.py``): bit-identical to the kernel, counted once per bank,
recounted after any write, never used where alpha is not one positive value, gone with the bank."""

from __future__ import annotations

import gc

import pytest
import torch

from supsup_fast import convert, inference, ops, reference
from supsup_fast._native import EXT_LOADED
from supsup_fast.backends import _shared_alpha
from supsup_fast.config import SupsupConfig
from supsup_fast.nn import MaskedLinear

pytestmark = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")

T = _shared_alpha.MIN_TASKS + 7


def _kernel():
    return torch.ops.supsup_fast_C.superpose.default


class _Spy:
    """The kernel, counting its calls and the alphas it was given."""

    def __init__(self):
        self.alphas = []

    def __call__(self, weight, bank, alpha):
        self.alphas.append(alpha.clone())
        return _kernel()(weight, bank, alpha)


def _bank(t, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([reference.pack_masks(torch.rand(shape, generator=g) < 0.5) for _ in range(t)])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32 if x.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70), (5, 3, 3, 3), (1, 33)])
def test_bit_identical_to_the_kernel(dtype, shape):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=g).to(dtype)
    bank = _bank(T, (shape[0], weight[0].numel()))
    for alpha in (torch.full((T,), 1.0 / T), torch.full((T,), 0.3, dtype=torch.float64)):
        want = _kernel()(weight, bank, alpha)
        for _ in range(2):  # the counting call and a cached one
            got = _shared_alpha.cached(_kernel())(weight, bank, alpha)
            assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
            assert torch.equal(_bits(got), _bits(want))


def test_one_bank_under_weights_of_every_accumulation_type():
    """The counts are kept in one accumulation type: a float32 weight after a float64 one on the same bank
    (or back) is recounted in its own, and gets its own dtype and the kernel's bits."""
    bank, alpha = _bank(T, (20, 50)), torch.full((T,), 1.0 / T)
    fn = _shared_alpha.cached(_kernel())
    for dtype in (torch.float64, torch.float32, torch.float16, torch.float64):
        weight = torch.randn(20, 50).to(dtype)
        got, want = fn(weight, bank, alpha), _kernel()(weight, bank, alpha)
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))


def test_counted_once_then_served_without_the_bank():
    weight, bank = torch.randn(20, 50), _bank(T, (20, 50))
    alpha = torch.full((T,), 1.0 / T)
    spy = _Spy()
    fn = _shared_alpha.cached(spy)
    first = fn(weight, bank, alpha)
    assert len(spy.alphas) == 1 and bool((spy.alphas[0] == 1).all())  # the count: every task at alpha 1
    second = fn(weight * 2, bank, torch.full((T,), 0.25))
    assert len(spy.alphas) == 1  # the same bank: no pass over it
    assert torch.equal(first, _kernel()(weight, bank, alpha))
    assert torch.equal(second, _kernel()(weight * 2, bank, torch.full((T,), 0.25)))


@pytest.mark.parametrize("write", ["row_copy", "inplace_not", "load_state_dict", "set_task"])
def test_recounted_after_a_write(write):
    weight = torch.randn(20, 50)
    layer_bank = _bank(T, (20, 50))
    alpha = torch.full((T,), 1.0 / T)
    spy = _Spy()
    fn = _shared_alpha.cached(spy)
    fn(weight, layer_bank, alpha)
    if write == "row_copy":
        layer_bank[3].copy_(_bank(1, (20, 50), seed=9)[0])  # through a view
    elif write == "inplace_not":
        layer_bank.bitwise_not_()
    elif write == "load_state_dict":
        holder = torch.nn.Module()
        holder.register_buffer("bank", layer_bank)
        holder.load_state_dict({"bank": _bank(T, (20, 50), seed=5)})
    else:
        layer_bank[:, 0, 0] = 0
    got = fn(weight, layer_bank, alpha)
    assert len(spy.alphas) == 2  # counted again
    assert torch.equal(got, _kernel()(weight, layer_bank, alpha))


def test_a_new_bank_is_counted_anew():
    weight, bank = torch.randn(20, 50), _bank(T, (20, 50))
    alpha = torch.full((T + 1,), 1.0 / (T + 1))
    spy = _Spy()
    fn = _shared_alpha.cached(spy)
    fn(weight, bank, alpha[:T])
    grown = torch.cat([bank, _bank(1, (20, 50), seed=4)])
    assert torch.equal(fn(weight, grown, alpha), _kernel()(weight, grown, alpha))
    assert len(spy.alphas) == 2


@pytest.mark.parametrize("case", ["two_values", "one_zero", "negative", "nan", "inf", "few_tasks"])
def test_the_kernel_serves_every_other_alpha(case):
    t = _shared_alpha.MIN_TASKS - 1 if case == "few_tasks" else T
    weight, bank = torch.randn(20, 50), _bank(t, (20, 50))
    alpha = torch.full((t,), 0.5)
    if case == "two_values":
        alpha[5] = 0.25
    elif case == "one_zero":
        alpha[0] = 0.0
    elif case == "negative":
        alpha = -alpha
    elif case == "nan":
        alpha = torch.full((t,), float("nan"))
    elif case == "inf":
        alpha = torch.full((t,), float("inf"))
    spy = _Spy()
    got = _shared_alpha.cached(spy)(weight, bank, alpha)
    assert len(spy.alphas) == 1  # one call of the kernel, on the caller's alpha
    passed = spy.alphas[0]
    assert torch.equal(passed.isnan(), alpha.isnan()) and torch.equal(passed.nan_to_num(), alpha.nan_to_num())
    want = _kernel()(weight, bank, alpha)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_inference_mode_banks_are_not_cached():
    weight = torch.randn(20, 50)
    with torch.inference_mode():
        bank = _bank(T, (20, 50))
    alpha = torch.full((T,), 1.0 / T)
    spy = _Spy()
    fn = _shared_alpha.cached(spy)
    fn(weight, bank, alpha)
    fn(weight, bank, alpha)
    assert len(spy.alphas) == 2 and bool((spy.alphas[1] == alpha).all())


def test_the_entry_goes_with_its_bank():
    weight, bank = torch.randn(20, 50), _bank(T, (20, 50))
    key = id(bank)
    _shared_alpha.cached(_kernel())(weight, bank, torch.full((T,), 1.0 / T))
    assert key in _shared_alpha._ENTRIES
    del bank
    gc.collect()
    assert key not in _shared_alpha._ENTRIES


def _lenet_with_tasks(t):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    convert.convert_(model, SupsupConfig(density=0.5, seed=0))
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, MaskedLinear)):
        n, k = layer.gemm_shape
        layer.bank = _bank(t, (n, k), seed=10 + i)
    return model.eval()


def test_task_inference_is_unchanged(monkeypatch):
    model = _lenet_with_tasks(T)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name, min_tasks in (("cached", _shared_alpha.MIN_TASKS), ("kernel", 10**9)):
        monkeypatch.setattr(_shared_alpha, "MIN_TASKS", min_tasks)
        _shared_alpha.clear()
        runs[name] = [inference.infer_task(model, x, method=m, batch_mode=b)
                      for m in ("one_shot", "binary") for b in ("batch", "per_example")]
    for a, b in zip(runs["cached"], runs["kernel"]):
        assert torch.equal(a.task_ids, b.task_ids)
        for ga, gb in zip(a.grads, b.grads):
            assert torch.equal(ga, gb)


def test_weight_gradient_through_the_cache():
    weight = torch.randn(20, 50, requires_grad=True)
    bank = _bank(T, (20, 50))
    alpha = torch.full((T,), 1.0 / T, requires_grad=True)
    grads = []
    for _ in range(2):
        out = ops.superpose(weight, bank, alpha)
        gw, ga = torch.autograd.grad((out * out).sum(), (weight, alpha))
        grads.append((gw, ga))
    with torch.no_grad():
        want = _kernel()(weight, bank, alpha.detach())
    assert torch.equal(ops.superpose(weight, bank, alpha).detach(), want)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    counts = _kernel()(torch.ones(20, 50), bank, torch.ones(T))
    torch.testing.assert_close(grads[0][0], 2 * want * counts / T, rtol=1e-6, atol=1e-7)
