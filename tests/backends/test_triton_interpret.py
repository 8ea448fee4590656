"""Every Triton kernel, run by Triton's interpreter on CPU tensors, against the reference path.

``TRITON_INTERPRET=1`` must be set before ``triton`` or the kernels are imported, so the cases
run in a child pytest process with that environment: ``test_kernels_under_interpreter`` starts it
and fails with the child's report. Inside the child only the cases run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_CHILD_FLAG = "SUPSUP_FAST_INTERPRET_CHILD"
IN_CHILD = os.environ.get(_CHILD_FLAG) == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False


@pytest.mark.skipif(IN_CHILD, reason="the child process runs the cases themselves")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton kernels failed:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


OP_TABLE_TESTS = [str(Path(__file__).resolve().parents[1] / "ops" / name) for name in
                  ("test_cases.py", "test_nonfinite.py")]


@pytest.mark.skipif(IN_CHILD, reason="the child process runs the cases themselves")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_op_case_table_under_interpreter():
    """The op case table and the NaN/Inf semantics on the triton backend's kernels, interpreted: the
    same cases every other backend runs (tests/ops/ registers triton for CPU tensors under the
    interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *OP_TABLE_TESTS, "-q", "-k", "triton", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"the op case table failed on the interpreted triton backend:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import warnings
warnings.simplefilter("ignore")
import supsup_fast
from supsup_fast import ops
from supsup_fast.backends import triton as triton_backend
b = triton_backend.register_triton(devices=("cpu",))
assert not b.available and "triton" in b.why_unavailable, b
assert ops.choose("masked_linear", "cpu", __import__("torch").float32).name != "triton"
import supsup_fast.kernels  # the package itself stays importable
print("ok")
"""


@pytest.mark.skipif(IN_CHILD, reason="runs once, in the parent process")
def test_backends_import_without_triton():
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ======================================================================================
# The cases (child process only)
# ======================================================================================
PARENT_TESTS = ("test_kernels_under_interpreter", "test_backends_import_without_triton",
                "test_op_case_table_under_interpreter")


@pytest.fixture(autouse=True)
def _only_in_child(request):
    if not IN_CHILD and request.node.originalname not in PARENT_TESTS:
        pytest.skip("runs in the TRITON_INTERPRET child process")


if IN_CHILD:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from supsup_fast import ops
    from supsup_fast import reference as ref
    from supsup_fast.backends.triton import register_triton, triton_impls
    from supsup_fast.kernels import mask_ops as mo
    from supsup_fast.kernels import masked_matmul as mm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative Frobenius error against the fp32 reference evaluated on the same (rounded) inputs
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (M, N, K): one row, decode-sized batches, odd N/K, K split 2-3 ways (the interpreter counts 4
# SMs), the GEMV's 32- and 64-row tiles, M past the GEMV cut
SHAPES = [(1, 7, 33), (5, 7, 33), (1, 40, 300), (8, 33, 520), (37, 70, 65), (64, 40, 600), (130, 9, 100)]


def _rel(out, want):
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def _close(out, want, dtype):
    assert out.dtype == dtype and out.shape == want.shape, (out.dtype, out.shape, want.shape)
    assert torch.isfinite(out.float()).all()
    err = _rel(out, want)
    assert err <= RTOL[dtype], f"relative error {err:.2e} > {RTOL[dtype]:.0e} for {dtype}"


def _masks(*shape, p=0.5, gen=None):
    return torch.rand(*shape, generator=gen) < p


def _inputs(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    words = ref.pack_masks(_masks(n, k, gen=g))
    return x, w, b, words


# ---- matmuls --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_linear(m, n, k, dtype, with_bias):
    x, w, b, words = _inputs(m, n, k, dtype, seed=m * 1000 + n + k)
    b = b if with_bias else None
    out = mm.masked_linear(x, w, words, b)
    want = ref.masked_linear(x.float(), w.float(), words, None if b is None else b.float())
    _close(out, want, dtype)


def test_masked_linear_leading_dims_and_empty():
    x, w, b, words = _inputs(12, 20, 70, torch.float32, seed=1)
    x3 = x.reshape(3, 4, 70)
    torch.testing.assert_close(mm.masked_linear(x3, w, words, b), ref.masked_linear(x3, w, words, b))
    empty = mm.masked_linear(x[:0], w, words, b)
    assert empty.shape == (0, 20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (5, 40, 97), (3, 600, 40), (37, 70, 65), (64, 33, 200), (70, 20, 50)])
def test_masked_linear_grad_input(m, n, k, dtype):
    _, w, _, words = _inputs(m, n, k, dtype, seed=7 * m + k)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).to(dtype)
    _close(mm.masked_linear_grad_input(g, w, words), ref.masked_linear_grad_input(g.float(), w.float(), words), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", [((1,), 7, 33), ((2, 3), 40, 97), ((130,), 9, 65)])
def test_masked_weight_grad(lead, n, k, dtype):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    g = torch.randn(*lead, n, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    _close(mm.masked_weight_grad(g, x, w), ref.masked_weight_grad(g.float(), x.float(), w.float()).float(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,t", [(1, 7, 33, 3), (5, 7, 33, 5), (40, 70, 65, 4), (70, 9, 100, 9)])
def test_masked_linear_grouped(m, n, k, t, dtype):
    x, w, b, _ = _inputs(m, n, k, dtype, seed=m + 31 * t)
    gen = torch.Generator().manual_seed(t)
    bank = ref.pack_masks(_masks(t, n, k, gen=gen))
    ids = torch.randint(0, t, (m,), generator=gen)
    ids[ids == 1] = 2  # a task with no rows must be skipped, not break the loop
    out = mm.masked_linear_grouped(x, w, bank, ids, b)
    _close(out, ref.masked_linear_grouped(x.float(), w.float(), bank, ids, b.float()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_linear_grouped_one_task_tiles(dtype):
    """Tiles whose rows all share one task take the plain K loop; a tile across a task boundary
    the per-task one: both in one launch."""
    x, w, b, _ = _inputs(70, 40, 130, dtype, seed=11)
    bank = ref.pack_masks(_masks(3, 40, 130, gen=torch.Generator().manual_seed(11)))
    ids = torch.cat([torch.full((40,), 2), torch.full((30,), 0)])
    out = mm.masked_linear_grouped(x, w, bank, ids, b)
    _close(out, ref.masked_linear_grouped(x.float(), w.float(), bank, ids, b.float()), dtype)
    g = torch.randn(70, 40).to(dtype)
    _close(mm.masked_linear_grouped_grad_input(g, w, bank, ids),
           ref.masked_linear_grouped_grad_input(g.float(), w.float(), bank, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,t", [(1, 7, 33, 3), (40, 70, 65, 4), (70, 90, 140, 9)])
def test_masked_linear_grouped_grad_input(m, n, k, t, dtype):
    _, w, _, _ = _inputs(m, n, k, dtype, seed=m + 7 * t)
    gen = torch.Generator().manual_seed(t + 1)
    bank = ref.pack_masks(_masks(t, n, k, gen=gen))
    ids = torch.randint(0, t, (m,), generator=gen)
    g = torch.randn(m, n, generator=gen).to(dtype)
    out = mm.masked_linear_grouped_grad_input(g, w, bank, ids)
    _close(out, ref.masked_linear_grouped_grad_input(g.float(), w.float(), bank, ids), dtype)


def test_grouped_rows_with_out_of_range_tasks_get_only_the_bias():
    """The kernels never read outside the bank: such rows contribute nothing (the op layer rejects them)."""
    x, w, b, _ = _inputs(6, 10, 40, torch.float32, seed=3)
    bank = ref.pack_masks(_masks(3, 10, 40))
    ids = torch.tensor([0, 5, 2, -1, 1, 2])
    y = mm.masked_linear_grouped(x, w, bank, ids, b)
    ok = (ids >= 0) & (ids < 3)
    torch.testing.assert_close(y[ok], ref.masked_linear_grouped(x[ok], w, bank, ids[ok], b))
    torch.testing.assert_close(y[~ok], b.expand(2, -1))
    dx = mm.masked_linear_grouped_grad_input(torch.ones(6, 10), w, bank, ids)
    assert torch.equal(dx[~ok], torch.zeros(2, 40))


def test_split_reduction_rearms_its_counters():
    """Split-K GEMV and split-N dX leave every tile counter at zero for the next launch, and give
    the same bits on a second run (partials are summed in split order)."""
    x, w, b, words = _inputs(3, 70, 700, torch.float32, seed=4)  # 2 row tiles x 3 splits
    y1 = mm.masked_linear(x, w, words, b)
    y2 = mm.masked_linear(x, w, words, b)
    assert torch.equal(y1, y2)
    g = torch.randn(3, 700)
    dx = mm.masked_linear_grad_input(g, w.t().contiguous(), ref.pack_masks(_masks(700, 70)))
    assert dx.shape == (3, 70)
    ws, cnt = mm._WORKSPACES[("cpu", None, 0)]
    assert int(cnt.count_nonzero()) == 0


def test_m_bucket_keys():
    from supsup_fast.kernels._common import m_bucket

    assert [m_bucket(m) for m in (1, 16, 17, 64, 65, 1000, 1024, 1025, 10**6)] == [16, 16, 32, 64, 128, 1024, 1024,
                                                                                  2048, 8192]


# ---- signed-constant regeneration ---------------------------------------------------------
@pytest.mark.parametrize("seed,layer", [(0, 0), (1234, 3), (2**32 - 1, 2**31 + 5), (-7, 11)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_constant_bit_identical(seed, layer, dtype):
    n, k = 37, 75
    scale = math.sqrt(2.0) / math.sqrt(k)
    out = mo.signed_constant(seed, layer, n, k, scale, dtype=dtype, device="cpu")
    want = ref.signed_constant(seed, layer, (n, k), dtype=dtype, format_version=1)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (3, 40, 300), (37, 70, 65)])
def test_masked_linear_seeded(m, n, k, dtype):
    x, _, b, words = _inputs(m, n, k, dtype, seed=k)
    scale = 1.0 / math.sqrt(k)
    out = mm.masked_linear_seeded(x, words, 42, 3, scale, b)
    want = ref.masked_linear_seeded(x.float(), words, 42, 3, scale, b.float())
    _close(out, want, dtype)


def _seed_v2_weight(seed, layer, n, k, scale):
    """Seed format 2 as ``supsup_fast.seed_format`` specifies it: ``S(n, j) = H(R(n) ^ C(j))``,
    ``R(n) = H(kr ^ n)``, ``C(j) = H(kc ^ j)``,
    ``kr, kc = H(key ^ 0x243F6A88), H(key ^ 0x85A308D3)``;
    weight ``(n, k)`` is ``+scale`` iff bit ``k % 32`` of ``S(n, k // 32)`` is set."""
    key = ref.layer_key(seed, layer)
    kr, kc = (int(v) for v in ref.hash32(torch.tensor([key ^ 0x243F6A88, key ^ 0x85A308D3])))
    rows = ref.hash32(torch.arange(n) ^ kr)
    cols = ref.hash32(torch.arange((k + 31) // 32) ^ kc)
    words = ref.hash32(rows[:, None] ^ cols[None, :])
    bits = ((words[:, :, None] >> torch.arange(32)) & 1).reshape(n, -1)[:, :k].bool()
    c = torch.tensor(scale, dtype=torch.float32)
    return torch.where(bits, c, -c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 7, 33), (3, 40, 600), (37, 70, 65)])
def test_ternary_linear_seed_format_2(m, n, k, dtype):
    x, _, b, words = _inputs(m, n, k, dtype, seed=k + 1)
    scale = 1.0 / math.sqrt(k)
    out = mm.ternary_linear(x, words, 2**33 + 5, 3, scale, b)
    w = _seed_v2_weight(2**33 + 5, 3, n, k, scale).to(dtype).float()
    _close(out, ref.masked_linear(x.float(), w, words, b.float()), dtype)


# ---- mask kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 33), (3, 1), (40, 300), (8, 3, 3, 5), (2, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64])
def test_pack_unpack_roundtrip(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    dense = _masks(*shape, gen=gen)
    masks = dense.to(dtype)
    words = mo.pack_masks(masks)
    assert torch.equal(words, ref.pack_masks(masks))
    k = shape[-1]
    for out_dtype in (torch.bool, dtype, torch.float32):
        assert torch.equal(mo.unpack_masks(words, k, out_dtype), ref.unpack_masks(words, k, out_dtype))


def test_pack_sign_bit_and_padding():
    masks = torch.zeros(2, 65, dtype=torch.bool)
    masks[0, 31] = True  # bit 31 is the int32 sign bit
    masks[1, 64] = True  # lone bit in a padded last word
    words = mo.pack_masks(masks)
    assert words[0, 0].item() == -(2**31) and words[1, 2].item() == 1 and int(words.count_nonzero()) == 2


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(7, 33), (40, 300), (6, 3, 3, 3)])
def test_apply_mask(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    w = torch.randn(*shape, generator=gen).to(dtype)
    n, k = shape[0], math.prod(shape[1:])
    words = ref.pack_masks(_masks(n, k, gen=gen))
    assert torch.equal(mo.apply_mask(w, words), ref.apply_mask(w, words))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,shape", [(1, (7, 33)), (5, (40, 97)), (6, (4, 3, 3, 3))])
def test_superpose(t, shape, dtype):
    gen = torch.Generator().manual_seed(t)
    w = torch.randn(*shape, generator=gen).to(dtype)
    n, k = shape[0], math.prod(shape[1:])
    bank = ref.pack_masks(_masks(t, n, k, gen=gen))
    alpha = torch.rand(t, generator=gen)
    alpha[::2] = 0.0  # skipped tasks
    torch.testing.assert_close(mo.superpose(w, bank, alpha), ref.superpose(w, bank, alpha))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,t,n,k", [((), 3, 7, 33), ((2,), 5, 40, 97), ((3,), 17, 9, 300)])
def test_mask_dots(lead, t, n, k, dtype):
    gen = torch.Generator().manual_seed(t * k)
    v = torch.randn(*lead, n, k, generator=gen).to(dtype)
    bank = ref.pack_masks(_masks(t, n, k, gen=gen))
    out = mo.mask_dots(v, bank)
    want = ref.mask_dots(v.float(), bank)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.float(), want, rtol=RTOL[dtype] * 10, atol=RTOL[dtype] * 10 * math.sqrt(n * k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_conv2d(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 9, generator=gen).to(dtype)
    w = torch.randn(8, 3, 3, 3, generator=gen).to(dtype)
    b = torch.randn(8, generator=gen).to(dtype)
    words = ref.pack_masks(_masks(8, 27, gen=gen))
    if dtype == torch.float16:  # CPU conv2d in fp16 may be missing: compare in fp32
        x, w, b = x.float(), w.float(), b.float()
    out = triton_impls()["masked_conv2d"](x, w, words, b, (2, 1), (1, 0), (1, 2), 2)
    want = ref.masked_conv2d(x, w, words, b, (2, 1), (1, 0), (1, 2), 2)
    torch.testing.assert_close(out, want)


# ---- through the op layer, with autograd -------------------------------------------------------
@pytest.fixture
def triton_on_cpu():
    backend = register_triton(devices=("cpu",), priority=1000)
    assert backend.available, backend.why_unavailable
    try:
        with ops.force_backend("triton"):
            yield
    finally:
        register_triton()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 20])
def test_op_layer_masked_linear_st_grads(triton_on_cpu, m, dtype):
    x, w, b, words = _inputs(m, 24, 70, dtype, seed=m)
    scores = torch.randn(24, 70).to(dtype)

    def run(fn):
        xx, ss, bb = (t.detach().float().requires_grad_() for t in (x, scores, b))
        if fn is not None:
            xx, ss, bb = (t.detach().requires_grad_() for t in (x, scores, b))
        y = ops.masked_linear(xx, w if fn is not None else w.float(), words, bb, scores=ss)
        y.backward(torch.ones_like(y))
        return y, xx.grad, ss.grad, bb.grad

    got = run(True)
    with ops.force_backend("reference"):
        want = run(None)
    for a, b_ in zip(got, want):
        _close(a, b_.detach(), dtype)


def test_op_layer_superpose_and_mask_dots_grads(triton_on_cpu):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(9, 40, generator=gen)
    bank = ref.pack_masks(_masks(4, 9, 40, gen=gen))
    a0 = torch.rand(4, generator=gen)
    grad = torch.randn(9, 40, generator=gen)

    def run():
        w, alpha = w0.clone().requires_grad_(), a0.clone().requires_grad_()
        out = ops.superpose(w, bank, alpha)
        out.backward(grad)
        return out.detach(), w.grad, alpha.grad

    got = run()
    with ops.force_backend("reference"):
        want = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_op_layer_grouped_grads(triton_on_cpu):
    """The grouped op's input gradient runs the Triton grouped dX kernel (no Python loop over tasks)."""
    x, w, b, _ = _inputs(9, 12, 70, torch.float32, seed=5)
    bank = ref.pack_masks(_masks(3, 12, 70))
    ids = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1])

    def run():
        xx = x.clone().requires_grad_()
        y = ops.masked_linear_grouped(xx, w, bank, ids, b)
        y.backward(torch.ones_like(y))
        return y.detach(), xx.grad

    assert ops.choose("masked_linear_grouped_grad_input", "cpu", torch.float32, (x,)).name == "triton"
    got = run()
    with ops.force_backend("reference"):
        want = run()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_op_layer_opcheck(triton_on_cpu):
    x, w, b, words = _inputs(6, 10, 40, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.supsup_fast.masked_linear.default, (x, w, words, b))
    bank = ref.pack_masks(_masks(3, 10, 40))
    torch.library.opcheck(torch.ops.supsup_fast.masked_linear_grouped.default,
                          (x, w, bank, torch.tensor([0, 2, 2, 1, 0, 2]), b))
