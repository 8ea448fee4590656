"""Property-based fuzzing: every op on every CPU backend, and the bank loader on damaged files.

Ops are checked against an oracle written independently of the library (``numpy.packbits`` for
the bit format, dense float64 arithmetic on a bool mask for the rest) on random shapes, every
float dtype and non-contiguous inputs (transposed storage, stepped slices whose gaps hold NaN,
storage offsets): a backend that reads outside a view or assumes contiguity gives NaN or a wrong
value. Tolerances: an output may differ from the float64 oracle by at most
``tol(dtype) * scale``, where ``scale`` is the same sum over absolute values (a bound on the
rounding of any summation order) and ``tol = 4 eps(dtype) + terms * eps(accumulator)``
(:func:`supsup_fast.testing.summation_bound`, the project's one tolerance rule).

The loader is fed banks with random byte changes and truncations: it must either refuse them
with :class:`BankFileError` or return exactly the saved data.

The number of cases run per op/backend and the loader's outcomes are printed at the end.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supsup_fast import checkpoint, convert, ops, reference
from supsup_fast.config import SupsupConfig
from supsup_fast.errors import BankFileError
from supsup_fast.testing import EPS, summation_bound

CPU_BACKENDS = [b.name for b in ops.backends() if b.available and "cpu" in b.devices]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "stepped", "offset"]
CASES: collections.Counter = collections.Counter()
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    lines = [f"  {k:<62} {v}" for k, v in sorted(CASES.items())]
    text = "\nfuzz cases run (op[backend], loader outcomes):\n" + "\n".join(lines) + "\n"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        sys.stdout.write(text)
        sys.stdout.flush()


def forced(backend: str):
    """Force ``backend`` for every op it implements (the rest, e.g. conv's cuDNN path, choose freely)."""
    impls = next(b for b in ops.backends() if b.name == backend).impls
    return ops.force_backend(",".join(f"{op}={backend}" for op in impls))


def implements(backend: str, op: str) -> bool:
    return op in next(b for b in ops.backends() if b.name == backend).impls


# ======================================================================================
# Inputs: random values, random memory layouts
# ======================================================================================
def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout; gaps filled with NaN (floats) or junk (ints)."""
    if kind == "contiguous" or t.dim() == 0:
        return t.clone()
    fill = float("nan") if t.is_floating_point() else -1
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "stepped" or (kind == "transposed" and t.dim() < 2):
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), fill, dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    big = torch.full((t.numel() + 3,), fill, dtype=t.dtype)  # offset: storage_offset 3
    big[3:] = t.reshape(-1)
    return big[3:].view(t.shape)


def rand(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    """Values rounded to ``dtype`` (the oracle sees exactly these values)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def rand_mask(gen: torch.Generator, shape, density: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) < density


def np_pack(mask: torch.Tensor) -> torch.Tensor:
    """Independent packing oracle: numpy's little-endian packbits, rows padded to 32 bits."""
    m = mask.reshape(-1, mask.shape[-1]).numpy().astype(np.uint8)
    k = m.shape[1]
    w = (k + 31) // 32
    padded = np.zeros((m.shape[0], w * 32), np.uint8)
    padded[:, :k] = m
    words = np.packbits(padded, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(words.copy()).reshape(*mask.shape[:-1], w)


def np_unpack(words: torch.Tensor, k: int) -> torch.Tensor:
    w = words.contiguous().reshape(-1, words.shape[-1]).numpy().astype("<i4")
    bits = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")[:, :k]
    return torch.from_numpy(bits.astype(bool)).reshape(*words.shape[:-1], k)


def assert_close(out: torch.Tensor, want64: torch.Tensor, scale64: torch.Tensor, dtype, terms: int, what: str,
                 precision=None):
    """``precision``: the dtype whose rounding the result carries, when it differs from its own dtype."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    dtype = precision or dtype
    assert out.shape == want64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(want64.shape)}"
    tol = summation_bound(dtype, max(terms, 1))
    err = (out.double() - want64).abs()
    # below the smallest normal number the spacing is fixed: fp16 products of three N(0, 1)
    # values land there and carry an absolute, not relative, rounding error
    subnormal_step = torch.finfo(dtype).smallest_normal * EPS[dtype]
    bound = tol * scale64 + 4 * subnormal_step + 1e-300
    bad = ~(err <= bound)  # catches NaN
    worst = int(torch.argmax(err.flatten().nan_to_num(1e300))) if err.numel() else 0
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} elements off; max err {float(err.max()):.3g}, "
                           f"bound there {float(bound.flatten()[worst]):.3g}")


def weight_grad_precision(backend: str, dtype):
    """Known deviation, reported: ``reference.masked_weight_grad`` accumulates float64 inputs in float32."""
    if backend == "reference" and dtype == torch.float64:
        CASES["known deviation: reference masked_weight_grad fp64 -> fp32 accumulation"] += 1
        return torch.float32
    return None


backend_param = pytest.mark.parametrize("backend", CPU_BACKENDS)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


# ======================================================================================
# Packing
# ======================================================================================
@backend_param
@given(seed=st.integers(0, 2**31 - 1), lead=st.lists(st.integers(1, 3), max_size=2), n=st.integers(1, 9),
       k=st.integers(1, 130), density=st.floats(0, 1), kind=st.sampled_from(["bool", "float32", "float16", "int32"]),
       layout=layouts)
@settings(FUZZ, max_examples=60)
def test_pack_unpack_match_numpy(backend, seed, lead, n, k, density, kind, layout):
    gen = torch.Generator().manual_seed(seed)
    mask = rand_mask(gen, (*lead, n, k), density)
    dense = mask if kind == "bool" else mask.to(getattr(torch, kind)) * (1 + torch.rand(mask.shape, generator=gen)
                                                                           ).to(getattr(torch, kind))
    if kind == "int32":
        dense = mask.to(torch.int32) * torch.randint(1, 9, mask.shape, generator=gen, dtype=torch.int32)
    want = np_pack(mask)
    with forced(backend):
        words = ops.pack_masks(relayout(dense, layout))
        assert words.dtype == torch.int32 and torch.equal(words, want)
        for dt in (torch.bool, torch.float32, torch.bfloat16, torch.uint8):
            back = ops.unpack_masks(relayout(want, layout), k, dt)
            assert back.dtype == dt and torch.equal(back, mask.to(dt)), dt
    CASES[f"pack_masks/unpack_masks[{backend}]"] += 1


# ======================================================================================
# One task's mask
# ======================================================================================
@backend_param
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), k=st.integers(1, 100), dtype=dtypes,
       layouts=st.tuples(layouts, layouts, layouts))
@settings(FUZZ, max_examples=50)
def test_apply_mask_is_exact(backend, seed, n, k, dtype, layouts):
    gen = torch.Generator().manual_seed(seed)
    w, mask = rand(gen, (n, k), dtype), rand_mask(gen, (n, k), 0.5)
    words = np_pack(mask)
    g = rand(gen, (n, k), dtype)
    with forced(backend):
        W = relayout(w, layouts[0]).requires_grad_(True)
        S = relayout(torch.zeros(n, k, dtype=dtype), layouts[2]).requires_grad_(True)
        out = ops.apply_mask(W, relayout(words, layouts[1]), scores=S)
        out.backward(g)
    assert torch.equal(out, w * mask.to(dtype))
    assert torch.equal(S.grad, g * w)  # straight-through: dL/dS = dL/d(W*M) * W
    assert W.grad is None or torch.equal(W.grad, g * mask.to(dtype))
    with forced(backend):
        assert torch.equal(ops.apply_mask(relayout(w, layouts[0]), relayout(words, layouts[1])), w * mask.to(dtype))
    CASES[f"apply_mask[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), lead=st.lists(st.integers(0, 5), min_size=1, max_size=2),
       n=st.integers(1, 24), k=st.integers(1, 100), dtype=dtypes, bias=st.booleans(), train=st.booleans(),
       layouts=st.tuples(layouts, layouts, layouts, layouts))
@settings(FUZZ, max_examples=70)
def test_masked_linear_forward_and_gradients(backend, seed, lead, n, k, dtype, bias, train, layouts):
    gen = torch.Generator().manual_seed(seed)
    x, w = rand(gen, (*lead, k), dtype), rand(gen, (n, k), dtype)
    b = rand(gen, (n,), dtype) if bias else None
    mask = rand_mask(gen, (n, k), 0.5)
    g = rand(gen, (*lead, n), dtype)
    words = np_pack(mask)
    with forced(backend):
        X = relayout(x, layouts[0]).requires_grad_(True)
        W = relayout(w, layouts[1]).requires_grad_(not train)
        B = relayout(b, layouts[3]).requires_grad_(True) if bias else None
        S = torch.zeros(n, k, dtype=dtype, requires_grad=True) if train else None
        y = ops.masked_linear(X, W, relayout(words, layouts[2]), B, scores=S)
        y.backward(g)
    # float64 oracle on the dense mask
    x64, w64, g64, m64 = x.double(), w.double(), g.double(), mask.double()
    we = w64 * m64
    want = x64 @ we.t() + (b.double() if bias else 0)
    scale = x64.abs() @ we.abs().t() + (b.double().abs() if bias else 0)
    assert_close(y, want, scale, dtype, k, "y")
    assert_close(X.grad, g64 @ we, g64.abs() @ we.abs(), dtype, n, "dx")
    g2, x2 = g64.reshape(-1, n), x64.reshape(-1, k)
    dwe, dwe_scale = g2.t() @ x2, g2.t().abs() @ x2.abs()
    rows = max(g2.shape[0], 1)
    if train:
        assert_close(S.grad, dwe * w64, dwe_scale * w64.abs(), dtype, rows, "dscores",
                     precision=weight_grad_precision(backend, dtype))
    else:
        assert_close(W.grad, dwe * m64, dwe_scale * m64, dtype, rows, "dW")
    if bias:
        assert_close(B.grad, g2.sum(0), g2.abs().sum(0), dtype, rows, "db")
    CASES[f"masked_linear(+grads)[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 9), n=st.integers(1, 24), k=st.integers(1, 100),
       dtype=dtypes, layouts=st.tuples(layouts, layouts, layouts))
@settings(FUZZ, max_examples=40)
def test_grad_input_and_weight_grad(backend, seed, m, n, k, dtype, layouts):
    gen = torch.Generator().manual_seed(seed)
    g, x, w = rand(gen, (m, n), dtype), rand(gen, (m, k), dtype), rand(gen, (n, k), dtype)
    mask = rand_mask(gen, (n, k), 0.5)
    with forced(backend):
        dx = ops.masked_linear_grad_input(relayout(g, layouts[0]), relayout(w, layouts[1]),
                                          relayout(np_pack(mask), layouts[2]))
        ds = ops.masked_weight_grad(relayout(g, layouts[0]), relayout(x, layouts[2]), relayout(w, layouts[1]))
    we = w.double() * mask.double()
    assert_close(dx, g.double() @ we, g.double().abs() @ we.abs(), dtype, n, "grad_input")
    dwe = g.double().t() @ x.double()
    assert_close(ds, dwe * w.double(), (g.double().abs().t() @ x.double().abs()) * w.double().abs(), dtype, m,
                 "weight_grad", precision=weight_grad_precision(backend, dtype))
    CASES[f"masked_linear_grad_input+masked_weight_grad[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), groups=st.sampled_from([1, 2]),
       cin=st.integers(1, 3), cout=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3),
       hw=st.integers(3, 7), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), bias=st.booleans(),
       layouts=st.tuples(layouts, layouts))
@settings(FUZZ, max_examples=40)
def test_masked_conv2d_forward_and_gradients(backend, seed, batch, groups, cin, cout, kh, kw, hw, stride, padding,
                                             dilation, dtype, bias, layouts):
    if dilation * (max(kh, kw) - 1) + 1 > hw + 2 * padding:
        return
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cin * groups, cout * groups
    x, w = rand(gen, (batch, cin, hw, hw), dtype), rand(gen, (cout, cin // groups, kh, kw), dtype)
    b = rand(gen, (cout,), dtype) if bias else None
    mask = rand_mask(gen, w.shape, 0.5)
    words = np_pack(mask.reshape(cout, -1))
    with forced(backend):
        X = relayout(x, layouts[0]).requires_grad_(True)
        W = relayout(w, layouts[1]).requires_grad_(True)
        y = ops.masked_conv2d(X, W, words, b, stride, padding, dilation, groups)
        g = rand(gen, y.shape, dtype)
        y.backward(g)
    x64 = x.detach().double().clone().requires_grad_(True)
    we = (w.detach().double() * mask.double()).requires_grad_(True)
    want = F.conv2d(x64, we, None if b is None else b.double(), stride, padding, dilation, groups)
    scale = F.conv2d(x64.detach().abs(), we.detach().abs(), None if b is None else b.double().abs(), stride, padding,
                     dilation, groups)
    terms = cin // groups * kh * kw
    assert_close(y, want.detach(), scale, dtype, terms, "conv y")
    want.backward(g.double())
    # gradient tolerances: scaled by the same gradients computed on absolute values
    xa, wa = x64.detach().abs().requires_grad_(True), we.detach().abs().requires_grad_(True)
    F.conv2d(xa, wa, None, stride, padding, dilation, groups).backward(g.double().abs())
    assert_close(X.grad, x64.grad, xa.grad, dtype, terms * cout, "conv dx")
    assert_close(W.grad, we.grad * mask.double(), wa.grad * mask.double(), dtype, batch * y.shape[-1] * y.shape[-2],
                 "conv dW")
    CASES[f"masked_conv2d(+grads)[{backend}]"] += 1


# ======================================================================================
# Many tasks' masks
# ======================================================================================
@backend_param
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 7), n=st.integers(1, 16), k=st.integers(1, 100),
       dtype=dtypes, zeros=st.integers(0, 7), layouts=st.tuples(layouts, layouts, layouts))
@settings(FUZZ, max_examples=50)
def test_superpose_and_alpha_gradient(backend, seed, t, n, k, dtype, zeros, layouts):
    gen = torch.Generator().manual_seed(seed)
    w, masks = rand(gen, (n, k), dtype), rand_mask(gen, (t, n, k), 0.5)
    alpha = torch.rand(t, generator=gen, dtype=torch.float64).float()
    alpha[torch.randperm(t, generator=gen)[: min(zeros, t - 1)]] = 0.0
    g = rand(gen, (n, k), dtype)
    with forced(backend):
        A = alpha.clone().requires_grad_(True)
        out = ops.superpose(relayout(w, layouts[0]), relayout(np_pack(masks), layouts[1]), relayout(A, layouts[2]))
        out.backward(g)
    mix = (alpha.double()[:, None, None] * masks.double()).sum(0)
    assert_close(out, w.double() * mix, w.double().abs() * mix.abs(), dtype, t, "superpose")
    v = g.double() * w.double()
    want_ga = (v[None] * masks.double()).sum((1, 2))
    # d/dalpha = mask_dots(grad * W) is computed in W's dtype, then cast to alpha's
    assert_close(A.grad, want_ga, (v.abs()[None] * masks.double()).sum((1, 2)), torch.float32, n * k, "dalpha",
                 precision=dtype if EPS[dtype] > EPS[torch.float32] else torch.float32)
    CASES[f"superpose(+dalpha)[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), rows=st.sampled_from([None, 1, 3]), t=st.integers(0, 9),
       n=st.integers(1, 16), k=st.integers(1, 100), dtype=dtypes, layouts=st.tuples(layouts, layouts))
@settings(FUZZ, max_examples=50)
def test_mask_dots(backend, seed, rows, t, n, k, dtype, layouts):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, k) if rows is None else (rows, n, k)
    v, masks = rand(gen, shape, dtype), rand_mask(gen, (t, n, k), 0.5)
    with forced(backend):
        V = relayout(v, layouts[0]).requires_grad_(True)
        out = ops.mask_dots(V, relayout(np_pack(masks), layouts[1]))
        g = rand(gen, out.shape, dtype)
        if t:
            out.backward(g)
    v64 = v.double().unsqueeze(-3) if rows is not None else v.double().unsqueeze(0)
    want = (v64 * masks.double()).sum((-2, -1))
    scale = (v64.abs() * masks.double()).sum((-2, -1))
    assert_close(out, want, scale, dtype, n * k, "mask_dots")
    if t:  # d<v, M_t>/dv = sum_t g_t M_t
        gm = g.double().unsqueeze(-1).unsqueeze(-1) * masks.double()
        assert_close(V.grad, gm.sum(-3), gm.abs().sum(-3), dtype, t, "mask_dots dv")
    CASES[f"mask_dots(+dv)[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 12), t=st.integers(1, 5), n=st.integers(1, 16),
       k=st.integers(1, 80), dtype=dtypes, bias=st.booleans(), layouts=st.tuples(layouts, layouts, layouts))
@settings(FUZZ, max_examples=40)
def test_masked_linear_grouped(backend, seed, m, t, n, k, dtype, bias, layouts):
    gen = torch.Generator().manual_seed(seed)
    x, w = rand(gen, (m, k), dtype), rand(gen, (n, k), dtype)
    b = rand(gen, (n,), dtype) if bias else None
    masks = rand_mask(gen, (t, n, k), 0.5)
    ids = torch.randint(0, t, (m,), generator=gen)
    with forced(backend):
        X = relayout(x, layouts[0]).requires_grad_(True)
        y = ops.masked_linear_grouped(X, relayout(w, layouts[1]), relayout(np_pack(masks), layouts[2]),
                                      relayout(ids, layouts[2]), b)
        g = rand(gen, y.shape, dtype)
        y.backward(g)
    we = w.double()[None] * masks.double()  # [T, N, K]
    want = torch.einsum("mk,mnk->mn", x.double(), we[ids]) + (b.double() if bias else 0)
    scale = torch.einsum("mk,mnk->mn", x.double().abs(), we[ids].abs()) + (b.double().abs() if bias else 0)
    assert_close(y, want, scale, dtype, k, "grouped y")
    want_dx = torch.einsum("mn,mnk->mk", g.double(), we[ids])
    assert_close(X.grad, want_dx, torch.einsum("mn,mnk->mk", g.double().abs(), we[ids].abs()), dtype, n, "grouped dx")
    CASES[f"masked_linear_grouped(+dx)[{backend}]"] += 1


@backend_param
@given(seed=st.integers(0, 2**31 - 1), hseed=st.integers(0, 2**32 - 1), layer=st.integers(0, 2**31 - 1),
       lead=st.lists(st.integers(0, 4), min_size=1, max_size=2), n=st.integers(1, 20), k=st.integers(1, 90),
       dtype=dtypes, bias=st.booleans(), layouts=st.tuples(layouts, layouts))
@settings(FUZZ, max_examples=40)
def test_masked_linear_seeded(backend, seed, hseed, layer, lead, n, k, dtype, bias, layouts):
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, (*lead, k), dtype)
    b = rand(gen, (n,), dtype) if bias else None
    mask = rand_mask(gen, (n, k), 0.5)
    scale_c = 1.0 / math.sqrt(k)
    with forced(backend):
        X = relayout(x, layouts[0]).requires_grad_(True)
        y = ops.masked_linear_seeded(X, relayout(np_pack(mask), layouts[1]), hseed, layer, scale_c, b)
        g = rand(gen, y.shape, dtype)
        y.backward(g)
    signs = reference.signed_constant_signs(hseed, layer, n * k).reshape(n, k)
    w = torch.where(signs, scale_c, -scale_c).to(dtype).double()  # the weight as the dtype holds it
    we = w * mask.double()
    want = x.double() @ we.t() + (b.double() if bias else 0)
    scale = x.double().abs() @ we.abs().t() + (b.double().abs() if bias else 0)
    assert_close(y, want, scale, dtype, k, "seeded y")
    assert_close(X.grad, g.double() @ we, g.double().abs() @ we.abs(), dtype, n, "seeded dx")
    CASES[f"masked_linear_seeded(+dx)[{backend}]"] += 1


# ======================================================================================
# The loader on damaged banks
# ======================================================================================
def _tiny():
    net = torch.nn.Sequential(torch.nn.Linear(40, 12, bias=False), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                              torch.nn.Linear(12, 5, bias=False))
    return convert.convert_(net, SupsupConfig(seed=1))


@pytest.fixture(scope="module")
def pristine():
    d = tempfile.mkdtemp(prefix="supsup-fuzz-")
    model = _tiny()
    torch.manual_seed(0)
    for _ in range(3):
        convert.begin_task(model)
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 40))
        convert.freeze_task(model)
    checkpoint.save_bank(model, os.path.join(d, "bank"), task_names=["a", "b", "c"], metadata={"k": [1, 2]})
    files = sorted(os.listdir(os.path.join(d, "bank")))
    state = {n: b.clone() for n, b in model.named_buffers()}
    yield d, files, state
    shutil.rmtree(d, ignore_errors=True)


@given(data=st.data())
@settings(FUZZ, max_examples=150)
def test_loader_refuses_or_returns_the_saved_data(pristine, data):
    root, files, state = pristine
    work = tempfile.mkdtemp(prefix="supsup-fuzz-case-")
    try:
        bank = os.path.join(work, "bank")
        shutil.copytree(os.path.join(root, "bank"), bank)
        target = data.draw(st.sampled_from([f for f in files if f != checkpoint.LOCK]), label="file")
        path = os.path.join(bank, target)
        raw = bytearray(open(path, "rb").read())
        action = data.draw(st.sampled_from(["flip", "byte", "truncate", "extend"]), label="action")
        if action == "truncate":
            raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="keep")]
        elif action == "extend":
            raw += bytes(data.draw(st.binary(min_size=1, max_size=16), label="extra"))
        else:
            for _ in range(data.draw(st.integers(1, 4), label="count")):
                pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
                if action == "flip":
                    raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
                else:
                    raw[pos] = data.draw(st.integers(0, 255), label="value")
        open(path, "wb").write(bytes(raw))
        model = _tiny()
        try:
            checkpoint.verify_bank(bank)
            verified = True
        except BankFileError:
            verified = False
        try:
            info = checkpoint.load_bank(model, bank)
        except BankFileError:
            assert not verified, "verify_bank passed a bank that load_bank refuses"
            CASES["loader: refused with BankFileError"] += 1
        else:
            assert verified, "load_bank accepted a bank that verify_bank refuses"
            for n, b in model.named_buffers():
                assert torch.equal(b, state[n]), f"{n} loaded wrong data from a damaged bank ({action} {target})"
            assert info.task_names == ["a", "b", "c"] and info.metadata == {"k": [1, 2]}
            CASES["loader: accepted, data identical"] += 1
        try:
            lazy = checkpoint.LazyBank(bank)
            for t in range(lazy.num_tasks):
                got = lazy.masks(t)
                for name, words in got.items():
                    assert torch.equal(words, state[f"{name}.bank"][t])
        except BankFileError:
            CASES["lazy loader: refused with BankFileError"] += 1
        else:
            CASES["lazy loader: accepted, data identical"] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
