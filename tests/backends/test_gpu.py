"""Every op on every GPU backend (``triton``, ``cuda``) against the reference, on CUDA tensors.

Skipped without a CUDA device. Each case forces one backend for one op (``op=backend``), so a
backend that silently declined would fail the test instead of passing through the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from supsup_fast import ops
from supsup_fast import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative Frobenius error against an fp32 reference on the same rounded inputs (fp32 dots are
# IEEE unless torch allows tf32, as it does not by default)
RTOL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# the split GEMV's 16/32/64-row tiles and its splits, the GEMM past 64 rows, odd N/K
SHAPES = [(1, 7, 33), (5, 40, 300), (16, 100, 784), (17, 300, 100), (64, 4096, 1024), (65, 256, 512),
          (300, 513, 777), (1, 1000, 3000), (3, 4096, 4096)]


def _backend_ops(name):
    b = {b.name: b for b in ops.backends()}.get(name)
    if b is None or not b.available:
        return set()
    return set(b.impls)


def _params(op):
    return [pytest.param(name, marks=pytest.mark.skipif(op not in _backend_ops(name), reason=f"{name} lacks {op}"))
            for name in ("triton", "cuda")]


def _rel(out, want):
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def _close(out, want, dtype):
    assert out.dtype == dtype and out.shape == want.shape, (out.dtype, out.shape, want.shape)
    assert out.device.type == "cuda"
    err = _rel(out, want)
    assert err <= RTOL[dtype], f"relative error {err:.2e} > {RTOL[dtype]:.0e}"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _masks(*shape, g):
    return torch.rand(*shape, generator=g, device=DEV) < 0.5


def _inputs(m, n, k, dtype, seed=0):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    w = torch.randn(n, k, generator=g, device=DEV).to(dtype)
    b = torch.randn(n, generator=g, device=DEV).to(dtype)
    return x, w, b, ref.pack_masks(_masks(n, k, g=g))


def _forced(op, backend):
    return ops.force_backend(f"{op}={backend}")


# ---- matmuls -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _params("masked_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_masked_linear(backend, m, n, k, dtype):
    x, w, b, words = _inputs(m, n, k, dtype, seed=m + n + k)
    with _forced("masked_linear", backend):
        out = ops.masked_linear(x, w, words, b)
    _close(out, ref.masked_linear(x.float(), w.float(), words, b.float()), dtype)


@pytest.mark.parametrize("backend", _params("masked_linear_grad_input"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_training_grads(backend, m, n, k, dtype):
    """Forward and backward of the straight-through op: dX (transposed mask access), dS, db."""
    x, w, b, words = _inputs(m, n, k, dtype, seed=k)
    scores = torch.randn(n, k, device=DEV).to(dtype)
    gy = torch.randn(m, n, device=DEV).to(dtype)

    def run(xx, ww, ss, bb):
        xx, ss, bb = (t.detach().clone().requires_grad_() for t in (xx, ss, bb))
        y = ops.masked_linear(xx, ww, words, bb, scores=ss)
        y.backward(gy.to(y.dtype))
        return y, xx.grad, ss.grad, bb.grad

    spec = f"masked_linear={backend},masked_linear_grad_input={backend},masked_weight_grad={backend}"
    with ops.force_backend(spec):
        got = run(x, w, scores, b)
    with ops.force_backend("reference"):
        want = run(x.float(), w.float(), scores.float(), b.float())
    for a, e in zip(got, want):
        _close(a, e.detach(), dtype)


@pytest.mark.parametrize("backend", _params("masked_linear_grouped"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,t", [(1, 7, 33, 3), (37, 70, 65, 5), (500, 256, 300, 9)])
def test_masked_linear_grouped(backend, m, n, k, t, dtype):
    x, w, b, _ = _inputs(m, n, k, dtype, seed=t)
    g = _gen(t)
    bank = ref.pack_masks(_masks(t, n, k, g=g))
    ids = torch.randint(0, t, (m,), generator=g, device=DEV)
    with _forced("masked_linear_grouped", backend):
        out = ops.masked_linear_grouped(x, w, bank, ids, b)
    _close(out, ref.masked_linear_grouped(x.float(), w.float(), bank, ids, b.float()), dtype)


@pytest.mark.parametrize("backend", _params("masked_linear_seeded"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (4, 300, 784), (8, 1000, 3000), (64, 257, 100)])
def test_masked_linear_seeded(backend, m, n, k, dtype):
    x, _, b, words = _inputs(m, n, k, dtype, seed=n)
    scale = math.sqrt(2.0 / k)
    with _forced("masked_linear_seeded", backend):
        try:
            out = ops.masked_linear_seeded(x, words, 2**33 + 5, 3, scale, b)
        except ops.BackendError as e:  # the CUDA GEMV declines many rows by design
            assert backend == "cuda" and m > 8, e
            return
    _close(out, ref.masked_linear_seeded(x.float(), words, 2**33 + 5, 3, scale, b.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fused_triton_matmuls_directly(m, n, k, dtype):
    """The fused kernels themselves, for every row count (the dispatch table may send a class to
    apply_mask + cuBLAS instead, so the op-level tests alone would not reach them)."""
    pytest.importorskip("triton")
    from supsup_fast.kernels import masked_matmul as mm

    x, w, b, words = _inputs(m, n, k, dtype, seed=m * n + k)
    g = torch.randn(m, n, generator=_gen(k), device=DEV).to(dtype)
    _close(mm.masked_linear(x, w, words, b), ref.masked_linear(x.float(), w.float(), words, b.float()), dtype)
    _close(mm.masked_linear_grad_input(g, w, words), ref.masked_linear_grad_input(g.float(), w.float(), words), dtype)


def test_fp32_matmuls_are_ieee_by_default():
    """torch does not allow tf32 for fp32 matmuls by default; neither do the fused kernels."""
    assert not torch.backends.cuda.matmul.allow_tf32
    x, w, b, words = _inputs(64, 512, 2048, torch.float32, seed=3)
    with _forced("masked_linear", "triton"):
        out = ops.masked_linear(x, w, words, b)
    assert _rel(out, ref.masked_linear(x.double(), w.double(), words, b.double())) < 1e-5  # tf32: ~3e-4


@pytest.mark.parametrize("m", [1, 40, 2000])
def test_masked_linear_in_a_cuda_graph(m):
    """The split GEMV (its workspace and counters) and the GEMM replay correctly from a graph."""
    x, w, b, words = _inputs(m, 1024, 2048, torch.float16, seed=m)
    with _forced("masked_linear", "triton"):
        want = ops.masked_linear(x, w, words, b)  # compiles / tunes outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = ops.masked_linear(x, w, words, b)
        for _ in range(3):
            x.normal_()
            g.replay()
            want = ops.masked_linear(x, w, words, b)
            torch.testing.assert_close(y, want)


def test_grouped_has_no_host_sync():
    """masked_linear_grouped captures into a CUDA graph (a device-to-host sync would fail the capture)."""
    x, w, b, _ = _inputs(64, 256, 300, torch.float16, seed=4)
    bank = ref.pack_masks(_masks(5, 256, 300, g=_gen(4)))
    ids = torch.randint(0, 5, (64,), generator=_gen(5), device=DEV)
    with _forced("masked_linear_grouped", "triton"):
        want = ops.masked_linear_grouped(x, w, bank, ids, b)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = ops.masked_linear_grouped(x, w, bank, ids, b)
        g.replay()
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_grad_input_on_gpu(dtype):
    x, w, b, _ = _inputs(300, 200, 333, dtype, seed=6)
    bank = ref.pack_masks(_masks(7, 200, 333, g=_gen(6)))
    ids = torch.randint(0, 7, (300,), generator=_gen(7), device=DEV)
    g = torch.randn(300, 200, device=DEV).to(dtype)
    with _forced("masked_linear_grouped_grad_input", "triton"):
        out = ops.masked_linear_grouped_grad_input(g, w, bank, ids)
    _close(out, ref.masked_linear_grouped_grad_input(g.float(), w.float(), bank, ids), dtype)


def test_autocast_like_f_linear():
    x, w, b, words = _inputs(32, 256, 512, torch.float32, seed=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.masked_linear(x, w, words, b)
        want = torch.nn.functional.linear(x, ref.apply_mask(w, words), b)
    assert out.dtype == want.dtype == torch.bfloat16
    _close(out, want.float().to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (8, 1000, 3000), (64, 257, 100)])
def test_ternary_linear_seed_format_2(m, n, k, dtype):
    pytest.importorskip("triton")
    import importlib.util
    from pathlib import Path

    from supsup_fast.kernels import masked_matmul as mm

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "roofline.py"
    spec = importlib.util.spec_from_file_location("roofline", path)
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    x, _, b, words = _inputs(m, n, k, dtype, seed=n + 1)
    scale = math.sqrt(2.0 / k)
    out = mm.ternary_linear(x, words, 2**33 + 5, 3, scale, b)
    w = roofline.seed_v2_weight(2**33 + 5, 3, n, k, scale, DEV).to(dtype).float()
    _close(out, ref.masked_linear(x.float(), w, words, b.float()), dtype)


# ---- mask kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _params("pack_masks"))
@pytest.mark.parametrize("shape", [(7, 33), (3, 1), (300, 784), (4, 64, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_pack_unpack(backend, shape, dtype):
    g = _gen(len(shape))
    masks = _masks(*shape, g=g).to(dtype)
    n, k = shape[-2], shape[-1]
    with ops.force_backend(f"pack_masks={backend},unpack_masks={backend}"):
        words = ops.pack_masks(masks)
        back = ops.unpack_masks(words, k, dtype)
    assert torch.equal(words, ref.pack_masks(masks))
    assert torch.equal(back, masks)
    assert words.shape[-2:] == (n, (k + 31) // 32)


@pytest.mark.parametrize("backend", _params("apply_mask"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_and_conv(backend, dtype):
    g = _gen(5)
    w = torch.randn(16, 8, 3, 3, generator=g, device=DEV).to(dtype)
    words = ref.pack_masks(_masks(16, 72, g=g))
    x = torch.randn(2, 16, 11, 11, generator=g, device=DEV).to(dtype)
    with ops.force_backend(f"apply_mask={backend},masked_conv2d={backend}"):
        assert torch.equal(ops.apply_mask(w, words), ref.apply_mask(w, words))
        out = ops.masked_conv2d(x, w, words, None, stride=2, padding=1, groups=2)
    _close(out, ref.masked_conv2d(x.float(), w.float(), words, None, (2, 2), (1, 1), (1, 1), 2), dtype)


@pytest.mark.parametrize("backend", _params("superpose"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,k,equal", [(1, 7, 33, False), (40, 300, 784, False), (300, 100, 300, True),
                                          (600, 64, 65, True), (2500, 300, 784, True), (1300, 64, 64, False)])
def test_superpose_and_grads(backend, t, n, k, equal, dtype):
    g = _gen(t)
    w = torch.randn(n, k, generator=g, device=DEV).to(dtype)
    bank = ref.pack_masks(_masks(t, n, k, g=g))
    alpha = torch.full((t,), 1.0 / t, device=DEV) if equal else torch.rand(t, generator=g, device=DEV)
    alpha[1::3] = 0.0
    grad = torch.randn(n, k, generator=g, device=DEV).to(dtype)

    def run(ww):
        ww, aa = ww.detach().clone().requires_grad_(), alpha.clone().requires_grad_()
        out = ops.superpose(ww, bank, aa)
        out.backward(grad.to(out.dtype))
        return out, ww.grad, aa.grad

    with ops.force_backend(f"superpose={backend},mask_dots={backend}" if "mask_dots" in _backend_ops(backend)
                           else f"superpose={backend}"):
        got = run(w)
    with ops.force_backend("reference"):
        want = run(w.float())
    _close(got[0], want[0].detach(), dtype)
    _close(got[1], want[1], dtype)
    torch.testing.assert_close(got[2].float(), want[2].float(), rtol=RTOL[dtype] * 5,
                               atol=RTOL[dtype] * 5 * math.sqrt(n * k))


@pytest.mark.parametrize("backend", _params("mask_dots"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,t,n,k", [((), 3, 7, 33), ((2,), 2500, 300, 784), ((3,), 2100, 100, 300),
                                        ((), 250, 1024, 1024)])
def test_mask_dots(backend, lead, t, n, k, dtype):
    g = _gen(t)
    v = torch.randn(*lead, n, k, generator=g, device=DEV).to(dtype)
    bank = ref.pack_masks(_masks(t, n, k, g=g))
    with _forced("mask_dots", backend):
        out = ops.mask_dots(v, bank)
    want = ref.mask_dots(v.float(), bank)
    assert out.dtype == dtype and out.shape == want.shape
    tol = RTOL[dtype] * 5
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol * math.sqrt(n * k))


# ---- the CUDA extension directly ---------------------------------------------------------------
@pytest.mark.skipif("cuda" not in [b.name for b in ops.backends() if b.available],
                    reason="extension built without CUDA")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_signed_constant_fill_bit_identical(dtype):
    out = torch.empty(300, 5, 5, dtype=dtype, device=DEV)
    with ops.force_backend("signed_constant_fill_=cuda"):
        ops.signed_constant_fill_(out, 2**35 + 11, 4, math.sqrt(2.0) / math.sqrt(25))
    assert torch.equal(out.cpu(), ref.signed_constant(2**35 + 11, 4, (300, 5, 5), dtype=dtype, format_version=1))


def test_triton_signed_constant_bit_identical():
    pytest.importorskip("triton")
    from supsup_fast.kernels import mask_ops

    signs = ref.signed_constant_signs(7, 2, 513 * 777).reshape(513, 777)
    for dtype in DTYPES:
        out = mask_ops.signed_constant(7, 2, 513, 777, 0.05, dtype=dtype, device=DEV)
        assert torch.equal(out.cpu(), torch.where(signs, 0.05, -0.05).to(dtype))


# ---- op contracts --------------------------------------------------------------------------------
def test_opcheck_on_cuda():
    x, w, b, words = _inputs(6, 40, 70, torch.float32)
    bank = ref.pack_masks(_masks(3, 40, 70, g=_gen(1)))
    cases = [
        (torch.ops.supsup_fast.masked_linear.default, (x, w, words, b)),
        (torch.ops.supsup_fast.masked_linear_st.default, (x, w, words, torch.randn_like(w), b)),
        (torch.ops.supsup_fast.superpose.default, (w, bank, torch.rand(3, device=DEV))),
        (torch.ops.supsup_fast.mask_dots.default, (w, bank)),
        (torch.ops.supsup_fast.masked_linear_grouped.default,
         (x, w, bank, torch.tensor([0, 2, 1, 1, 0, 2], device=DEV), b)),
        (torch.ops.supsup_fast.masked_linear_seeded.default, (x, words, 1, 2, 0.1, b)),
        (torch.ops.supsup_fast.pack_masks.default, (torch.rand(5, 70, device=DEV) < 0.5,)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x, w, b, words = _inputs(16, 64, 96, torch.float16)
    bank = ref.pack_masks(_masks(4, 64, 96, g=_gen(2)))
    alpha = torch.rand(4, device=DEV)

    def f(x):
        h = ops.masked_linear(x, w, words, b)
        return h + ops.superpose(w, bank, alpha).sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
