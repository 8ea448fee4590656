"""The ternary kernels (``supsup_fast.ternary``) against their reference twin and their documented order.

* forward and dL/dx against float64 evaluated on the spec's weights, on odd shapes (K not a
  multiple of 32 or 64, N odd, M = 1..9, leading dims, with and without bias), seed formats 1 and 2;
* bit for bit against a PyTorch emulation of the float32 order documented in csrc/cpu/ternary.cpp,
  on every instruction set this CPU has (AVX-512, AVX2, scalar) and for 1 and 2 threads;
* autograd (x and bias) and torch.library.opcheck of the registered ops;
* other dtypes go to the reference; the C++ op refuses them, and bad input gets a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch

from supsup_fast import SupsupError, reference, seed_format, ternary
from supsup_fast._native import _C, EXT_LOADED

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")
# relative error ||out - exact|| / ||exact|| against float64 on the same weights
TOL = {torch.float32: 3e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
U32 = 0xFFFFFFFF


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(m, n, k, seed, lead=None, density=0.5):
    g = _gen(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g)
    words = reference.pack_masks(torch.rand(n, k, generator=g) < density)
    bias = torch.randn(n, generator=g)
    gy = torch.randn(*(lead or (m,)), n, generator=g)
    return x, words, bias, gy


def _rel(out, exact):
    out, exact = out.double(), exact.double()
    return ((out - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def _isas():
    if not EXT_LOADED:
        return []
    have = ["scalar", "avx2"]
    try:
        _C.set_ternary_isa("avx512")
        have.append("avx512")
    except RuntimeError:
        pass
    finally:
        _C.set_ternary_isa("auto")
    return have


ISAS = _isas()


@pytest.fixture
def isa(request):
    _C.set_ternary_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_ternary_isa("auto")


# --------------------------------------------------------------------------------------
# The documented float32 order, emulated with PyTorch float32 ops
# --------------------------------------------------------------------------------------
def documented_forward(x, words, seed, layer, scale, bias, version):
    """csrc/cpu/ternary.cpp's order: x' = c x; 16-entry tables per group of 4; sums over groups in order."""
    m, k = x.shape
    n, nw = words.shape
    xs = torch.zeros(m, nw * 32)
    xs[:, :k] = x * torch.tensor(scale, dtype=torch.float32)
    a = xs.reshape(m, nw * 8, 4)
    tables = torch.zeros(m, nw * 8, 16)
    for b in range(16):
        t = torch.zeros(m, nw * 8)
        for i in range(4):
            if b >> i & 1:
                t = t + a[:, :, i]
        tables[:, :, b] = t
    s = seed_format.sign_words(seed, layer, n, k, version).to(torch.int64) & U32
    w = words.to(torch.int64) & U32
    pos, neg = w & s, w & ~s & U32
    acc_p, acc_q = torch.zeros(m, n), torch.zeros(m, n)
    for g in range(nw * 8):
        j, q = divmod(g, 8)
        acc_p = acc_p + tables[:, g, (pos[:, j] >> (4 * q)) & 15]
        acc_q = acc_q + tables[:, g, (neg[:, j] >> (4 * q)) & 15]
    y = acc_p - acc_q
    return y + bias if bias is not None else y


def documented_grad_input(gy, words, k, seed, layer, scale, version):
    """dx[k] = P[k] - Q[k], P[k] = sum of c dy[n] over the rows n (in order) whose weight (n, k) is +c."""
    m, n = gy.shape
    gs = gy * torch.tensor(scale, dtype=torch.float32)
    signs = seed_format.signs(seed, layer, (n, k), version)
    mask = reference.unpack_masks(words, k)
    acc_p, acc_q = torch.zeros(m, k), torch.zeros(m, k)
    for r in range(n):
        acc_p = torch.where(mask[r] & signs[r], acc_p + gs[:, r : r + 1], acc_p)
        acc_q = torch.where(mask[r] & ~signs[r], acc_q + gs[:, r : r + 1], acc_q)
    return acc_p - acc_q


SHAPES = [(1, 37, 70), (3, 100, 100), (9, 17, 33), (5, 65, 129), (2, 1, 1), (8, 33, 512), (1, 300, 31)]


@needs_ext
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_follows_the_documented_order_bit_for_bit(isa, version, m, n, k):
    x, words, bias, gy = _inputs(m, n, k, m * 1000 + n + k)
    seed, layer, scale = 2**33 + 17, 5, 0.0625 * 1.3
    for b in (bias, None):
        y = torch.ops.supsup_fast_C.ternary_linear(x, words, seed, layer, scale, b, version)
        assert torch.equal(y, documented_forward(x, words, seed, layer, scale, b, version)), b is None
    gx = torch.ops.supsup_fast_C.ternary_linear_grad_input(gy, words, k, seed, layer, scale, version)
    assert torch.equal(gx, documented_grad_input(gy, words, k, seed, layer, scale, version))


@needs_ext
def test_thread_count_does_not_change_a_bit():
    # large enough that both the forward's row blocks and dL/dx's column strips are split
    x, words, bias, gy = _inputs(3, 2500, 1000, 7)
    x1, _, _, gy1 = _inputs(1, 2500, 1000, 8)
    before = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs[threads] = [
                torch.ops.supsup_fast_C.ternary_linear(xx, words, 9, 4, 0.03, bias, v)
                for xx in (x, x1) for v in (1, 2)
            ] + [
                torch.ops.supsup_fast_C.ternary_linear_grad_input(g, words, 1000, 9, 4, 0.03, v)
                for g in (gy, gy1) for v in (1, 2)
            ]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Against float64 on the spec's weights
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("lead,n,k", [((1,), 37, 70), ((4,), 100, 100), ((9,), 17, 33), ((2, 3), 65, 129),
                                      ((7,), 31, 300), ((1,), 1, 1), ((6,), 200, 520)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_grad_input_match_float64(version, lead, n, k, with_bias):
    x, words, bias, gy = _inputs(None, n, k, n + k, lead=lead)
    bias = bias if with_bias else None
    seed, layer = 2**32 - 3, 2**31 + 9  # the top bits of both set
    scale = math.sqrt(2.0) / math.sqrt(k)
    w = seed_format.signed_constant_from_scale(seed, layer, n, k, scale, torch.float64, version=version)
    weff = reference.apply_mask(w, words)
    exact = torch.nn.functional.linear(x.double(), weff, None if bias is None else bias.double())
    y = ternary.ternary_linear(x, words, seed, layer, scale, bias, format_version=version)
    assert y.dtype == torch.float32 and y.shape == (*lead, n)
    assert _rel(y, exact) <= TOL[torch.float32]
    gx = ternary.ternary_linear_grad_input(gy, words, k, seed, layer, scale, format_version=version)
    assert gx.shape == (*lead, k)
    assert _rel(gx, gy.double() @ weff) <= TOL[torch.float32]
    # the reference twin is the same computation
    ry = reference.ternary_linear(x.double(), words, seed, layer, scale,
                                  None if bias is None else bias.double(), version)
    assert _rel(ry, exact) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_run_the_reference(dtype):
    x, words, bias, gy = _inputs(3, 21, 50, 4)
    x, bias, gy = x.to(dtype), bias.to(dtype), gy.to(dtype)
    scale = 0.2
    w = seed_format.signed_constant_from_scale(1, 2, 21, 50, scale, torch.float64, version=2)
    weff = reference.apply_mask(w, words)
    y = ternary.ternary_linear(x, words, 1, 2, scale, bias)
    assert y.dtype == dtype
    assert _rel(y, torch.nn.functional.linear(x.double(), weff, bias.double())) <= TOL[dtype]
    gx = ternary.ternary_linear_grad_input(gy, words, 50, 1, 2, scale)
    assert gx.dtype == dtype and _rel(gx, gy.double() @ weff) <= TOL[dtype]


@needs_ext
def test_autograd_through_the_op():
    x, words, bias, gy = _inputs(None, 19, 45, 11, lead=(2, 3))
    xr, br = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = ternary.ternary_linear(xr, words, 4, 6, 0.15, br)
    y.backward(gy)
    w = seed_format.signed_constant_from_scale(4, 6, 19, 45, 0.15, torch.float64, version=2)
    weff = reference.apply_mask(w, words)
    assert _rel(xr.grad, gy.double() @ weff) <= TOL[torch.float32]
    assert _rel(br.grad, gy.double().sum((0, 1))) <= TOL[torch.float32]
    # no grad wanted: the directly bound kernel gives the same bits as the op
    with torch.no_grad():
        assert torch.equal(ternary.ternary_linear(x, words, 4, 6, 0.15, bias),
                           torch.ops.supsup_fast_C.ternary_linear(x, words, 4, 6, 0.15, bias, 2))


@needs_ext
def test_opcheck():
    x, words, bias, gy = _inputs(4, 13, 40, 12)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.supsup_fast.ternary_linear.default, (x, words, 3, 4, 0.2, bias, 2))
    torch.library.opcheck(torch.ops.supsup_fast.ternary_linear_grad_input.default, (gy, words, 40, 3, 4, 0.2, 1))


@needs_ext
def test_edge_shapes():
    words = torch.zeros(5, 0, dtype=torch.int32)
    bias = torch.randn(5)
    y = ternary.ternary_linear(torch.randn(3, 0), words, 1, 2, 0.5, bias)
    assert torch.equal(y, bias.expand(3, 5))
    assert ternary.ternary_linear(torch.randn(0, 7), torch.zeros(5, 1, dtype=torch.int32), 1, 2, 0.5).shape == (0, 5)
    assert ternary.ternary_linear(torch.randn(2, 7), torch.zeros(0, 1, dtype=torch.int32), 1, 2, 0.5).shape == (2, 0)
    dx = ternary.ternary_linear_grad_input(torch.randn(2, 0), torch.zeros(0, 1, dtype=torch.int32), 7, 1, 2, 0.5)
    assert torch.equal(dx, torch.zeros(2, 7))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_bad_input_is_named():
    x, words, bias, _ = _inputs(2, 9, 40, 13)
    cases = [
        (dict(mask_words=words.to(torch.int64)), "mask_words must be int32"),
        (dict(mask_words=words[:, :1]), r"expected \[9, 2\] for a weight with N=9, K=40"),
        (dict(bias=bias[:5]), r"bias shape \(5,\) != \(9,\)"),
        (dict(bias=bias.double()), "bias dtype"),
        (dict(format_version=3), r"format_version must be one of \(1, 2\)"),
        (dict(seed=1.5), r"seed must be an int in \[0, 2\*\*32\)"),
        (dict(seed=2**32), r"seed must be in \[0, 2\*\*32\)"),
        (dict(layer=-1), r"layer must be in \[0, 2\*\*32\)"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(x=x.to(torch.int32)), "x must be a floating tensor"),
    ]
    for change, msg in cases:
        args = dict(x=x, mask_words=words, seed=1, layer=2, scale=0.5, bias=bias, format_version=2)
        args.update(change)
        with pytest.raises(SupsupError, match=msg):
            ternary.ternary_linear(**args)
    with pytest.raises(SupsupError, match="its last dim must be N=9"):
        ternary.ternary_linear_grad_input(torch.randn(2, 8), words, 40, 1, 2, 0.5)


@needs_ext
def test_compiled_op_refuses_other_dtypes_clearly():
    x, words, bias, _ = _inputs(2, 9, 40, 14)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.supsup_fast_C.ternary_linear(x.half(), words, 1, 2, 0.5, None, 2)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.supsup_fast_C.ternary_linear(x, words, 1, 2, 0.5, bias.double(), 2)
    with pytest.raises(RuntimeError, match="format_version must be 1 or 2"):
        torch.ops.supsup_fast_C.ternary_linear(x, words, 1, 2, 0.5, None, 0)
    with pytest.raises(RuntimeError, match="grad_out must be float32"):
        torch.ops.supsup_fast_C.ternary_linear_grad_input(torch.randn(2, 9).double(), words, 40, 1, 2, 0.5, 2)
    with pytest.raises(RuntimeError, match="expected auto, avx512, avx2 or scalar"):
        _C.set_ternary_isa("sse")


@needs_ext
def test_non_contiguous_inputs():
    x, words, bias, _ = _inputs(6, 23, 75, 15)
    want = torch.ops.supsup_fast_C.ternary_linear(x, words, 1, 2, 0.5, bias, 2)
    xt = x.t().contiguous().t()  # same values, column-major
    wt = words.t().contiguous().t()
    bt = torch.stack([bias, bias], 1)[:, 0]
    assert not (xt.is_contiguous() or wt.is_contiguous() or bt.is_contiguous())
    assert torch.equal(ternary.ternary_linear(xt, wt, 1, 2, 0.5, bt), want)


def _ieee(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T in float64 as elementwise products and sums (no BLAS shortcut around zeros)."""
    return (a.double()[:, None, :] * b.double()[None, :, :]).sum(-1)


@pytest.mark.parametrize("version", [1, 2])
def test_non_finite_inputs_follow_dense_semantics(version):
    # a NaN or Inf in x meets every weight of its column, kept or pruned (Inf * 0 = NaN), as in
    # F.linear(x, W * M); likewise for dL/dy in the input gradient
    x, words, bias, gy = _inputs(5, 37, 70, 16)
    x[1, 3] = float("nan")
    x[2, 10] = float("inf")
    x[3, 10], x[3, 44] = float("inf"), float("-inf")
    x[4, 69] = float("-inf")
    gy[0, 5] = float("inf")
    gy[2, 36] = float("nan")
    scale = 0.3
    w = seed_format.signed_constant_from_scale(7, 8, 37, 70, scale, torch.float64, version=version)
    weff = reference.apply_mask(w, words)
    want_y = _ieee(x, weff) + bias.double()
    want_gx = _ieee(gy, weff.t())
    y = ternary.ternary_linear(x, words, 7, 8, scale, bias, format_version=version)
    gx = ternary.ternary_linear_grad_input(gy, words, 70, 7, 8, scale, format_version=version)
    for got, want in ((y, want_y), (gx, want_gx)):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isinf(), want.isinf())
        inf = want.isinf()
        assert torch.equal(got[inf].sign(), want[inf].sign().float())
        fin = want.isfinite()
        assert _rel(got[fin], want[fin]) <= TOL[torch.float32]
    assert want_y.isnan().any() and want_y.isinf().any() and want_gx.isinf().any()

