"""Every op on every CPU backend against a float64 evaluation of the reference, forward and backward."""

import math
import zlib

import pytest
import torch

import supsup_fast
from supsup_fast import SupsupError, base_weights, ops, testing
from supsup_fast import reference as ref
from supsup_fast._native import EXT_LOADED
from supsup_fast.ops import _registry
from supsup_fast.testing import randn as _rand
from supsup_fast.testing import random_bank as _bank

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason=f"compiled extension not loaded: {supsup_fast._native.EXT_ERROR}")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _gen(seed):
    return testing.generator(seed)


def _check(out, exact, dtype):
    testing.assert_rel_close(out, exact, dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(fn, inputs, grad_out):
    """Output and input gradients of fn(*inputs) for a fixed upstream gradient."""
    leaves = [_leaf(t) if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [None if t is None or not t.is_floating_point() else t.grad for t in leaves]


def _exact(fn, inputs, grad_out):
    """The same computation in float64 on the reference backend."""
    up = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    with ops.force_backend("reference"):
        return _grads(fn, up, grad_out.double())


# --------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 784])
@pytest.mark.parametrize("src", [torch.bool, torch.uint8, torch.int32, torch.float16, torch.float32, torch.float64])
def test_pack_unpack(backend, k, src):
    g = _gen(k)
    keep = torch.rand(2, 3, 5, k, generator=g) < 0.4
    masks = torch.where(keep, torch.randn(keep.shape, generator=g).abs() + 1, torch.zeros(())).to(src)
    words = ops.pack_masks(masks)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 5, math.ceil(k / 32))
    assert torch.equal(words, ref.pack_masks(keep))
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16):
        assert torch.equal(ops.unpack_masks(words, k, dtype), keep.to(dtype))


def test_pack_empty(backend):
    assert ops.pack_masks(torch.zeros(0, 40, dtype=torch.bool)).shape == (0, 2)
    assert ops.unpack_masks(torch.zeros(3, 0, 2, dtype=torch.int32), 40).shape == (3, 0, 40)


# --------------------------------------------------------------------------------------
# one task's mask
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1), (5, 33), (3, 4, 3, 3), (2, 784)])
def test_apply_mask(backend, dtype, shape):
    n, k = shape[0], math.prod(shape[1:])
    w, words = _rand(shape, dtype, 1), _bank(1, n, k, 2)[0]
    scores, g = _rand(shape, dtype, 3), _rand(shape, dtype, 4)
    assert torch.equal(ops.apply_mask(w, words), ref.apply_mask(w, words))
    out, (gw, _, gs) = _grads(lambda a, b, c: ops.apply_mask(a, b, c), (w, words, scores), g)
    exact, (ew, _, es) = _exact(lambda a, b, c: ops.apply_mask(a, b, c), (w, words, scores), g)
    assert torch.equal(out, ref.apply_mask(w, words))
    # a weight that requires grad gets d(W*M)/dW = M (SupSup's frozen weight does not ask for it)
    _check(gw, g.double() * ref.unpack_masks(words, k, torch.float64).reshape(shape), dtype)
    _check(gs, es, dtype)
    out, (gw, _) = _grads(lambda a, b: ops.apply_mask(a, b), (w, words), g)
    _, (ew, _) = _exact(lambda a, b: ops.apply_mask(a, b), (w, words), g)
    _check(gw, ew, dtype)


LINEAR_CASES = [  # (lead shape of x, N, K): covers the few-row fused kernels and the GEMM path
    ((1,), 7, 1),
    ((3,), 5, 31),
    ((2, 3), 9, 33),
    ((8,), 4, 100),
    ((16,), 5, 40),
    ((17,), 6, 64),
    ((40,), 11, 100),
    ((1,), 12, 784),
    ((5,), 3, 784),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", LINEAR_CASES)
def test_masked_linear(backend, dtype, lead, n, k):
    with_bias = n % 2 == 1
    x, w = _rand((*lead, k), dtype, 1), _rand((n, k), dtype, 2)
    words, scores = _bank(1, n, k, 3)[0], _rand((n, k), dtype, 4)
    bias = _rand((n,), dtype, 5) if with_bias else None
    g = _rand((*lead, n), dtype, 6)

    def f(x, w, s, b):
        return ops.masked_linear(x, w, words, b, scores=s)

    out, (gx, gw, gs, gb) = _grads(f, (x, w, scores, bias), g)
    exact, (ex, ew, es, eb) = _exact(f, (x, w, scores, bias), g)
    _check(out, exact, dtype)
    _check(gx, ex, dtype)
    _check(gs, es, dtype)
    dense = g.double().reshape(-1, n).t() @ x.double().reshape(-1, k)
    _check(gw, dense * ref.unpack_masks(words, k, torch.float64), dtype)  # W trained too: (dy^T x) * M
    if with_bias:
        _check(gb, eb, dtype)
    # without scores, the frozen-weight path differentiates W through the mask
    out, (gx, gw, _) = _grads(lambda x, w, b: ops.masked_linear(x, w, words, b), (x, w, bias), g)
    _, (ex, ew, _) = _exact(lambda x, w, b: ops.masked_linear(x, w, words, b), (x, w, bias), g)
    _check(gw, ew, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", LINEAR_CASES)
def test_backward_products(backend, dtype, lead, n, k):
    w, words = _rand((n, k), dtype, 1), _bank(1, n, k, 2)[0]
    g, x = _rand((*lead, n), dtype, 3), _rand((*lead, k), dtype, 4)
    dx = ops.masked_linear_grad_input(g, w, words)
    _check(dx, ref.masked_linear_grad_input(g.double(), w.double(), words), dtype)
    ds = ops.masked_weight_grad(g, x, w)
    _check(ds, (g.double().reshape(-1, n).t() @ x.double().reshape(-1, k)) * w.double(), dtype)


def _avx512_gemm_state():
    from supsup_fast import _C

    return _C if EXT_LOADED and _C.cpu_has_avx512() else None


needs_avx512 = pytest.mark.skipif(_avx512_gemm_state() is None, reason="no AVX-512F CPU or no compiled extension")


@pytest.fixture
def avx512_switch():
    """The extension module, with the AVX-512 masked GEMM switched back on afterwards."""
    from supsup_fast import _C

    yield _C
    _C.set_avx512_enabled(True)


# rows: the microkernel's 8-row blocks and every remainder, 128-row chunks, the platform GEMM
# beyond 512 rows of a large layer. outputs: 16/32-wide panels and their remainders. K: the
# 16-column steps, the last partial step, and 256-column blocks.
GEMM_CASES = [
    (9, 1, 1), (10, 15, 16), (11, 16, 17), (12, 17, 31), (13, 31, 255), (14, 33, 256), (15, 47, 257),
    (16, 100, 300), (23, 64, 513), (129, 10, 100), (200, 33, 40), (300, 100, 300), (1100, 20, 50), (700, 520, 520),
    (40, 96, 17), (50, 40, 1),
]


@needs_avx512
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k", GEMM_CASES)
def test_masked_gemm_avx512(avx512_switch, m, n, k, threads):
    """The AVX-512 masked GEMMs (y and dL/dx) against float64, and against the paths they replace."""
    _C = avx512_switch
    x, w = _rand((m, k), torch.float32, m), _rand((n, k), torch.float32, n + 1)
    words, bias = _bank(1, n, k, k)[0], (_rand((n,), torch.float32, 3) if (m + n) % 2 else None)
    g = _rand((m, n), torch.float32, 4)
    exact = ref.masked_linear(x.double(), w.double(), words, None if bias is None else bias.double())
    exact_dx = ref.masked_linear_grad_input(g.double(), w.double(), words)
    grad_input = torch.ops.supsup_fast_C.masked_linear_grad_input
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for enabled in (True, False):
            _C.set_avx512_enabled(enabled)
            assert _C.avx512_enabled() == enabled
            results[enabled] = _C.masked_linear_cpu(x, w, words, bias), grad_input(g, w, words)
    finally:
        torch.set_num_threads(before)
    for y, dx in results.values():
        _check(y, exact, torch.float32)
        _check(dx, exact_dx, torch.float32)


@needs_avx512
def test_masked_gemm_avx512_layouts(avx512_switch):
    """3-D and strided x, a strided weight, and zero rows go through the masked GEMM unchanged."""
    _C = avx512_switch
    _C.set_avx512_enabled(True)
    x = _rand((3, 40, 2 * 70), torch.float32, 1)[..., ::2]  # [3, 40, 70], not contiguous
    w = _rand((70, 50), torch.float32, 2).t()  # [50, 70], not contiguous
    words, bias = _bank(1, 50, 70, 3)[0], _rand((50,), torch.float32, 4)
    out = ops.masked_linear(x, w, words, bias)
    assert out.shape == (3, 40, 50)
    _check(out, ref.masked_linear(x.double(), w.double(), words, bias.double()), torch.float32)
    empty = ops.masked_linear(x[:, :0], w, words, bias)
    assert empty.shape == (3, 0, 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_conv2d(backend, dtype):
    x, w = _rand((2, 4, 7, 6), dtype, 1), _rand((6, 2, 3, 3), dtype, 2)
    words, bias, g = _bank(1, 6, 18, 3)[0], _rand((6,), dtype, 4), _rand((2, 6, 5, 3), dtype, 5)

    def f(x, w, b):
        return ops.masked_conv2d(x, w, words, b, stride=(1, 2), padding=(0, 1), groups=2)

    def formula(x, w, b):  # plain autograd through conv2d(x, W * M): independent of the op's backward
        mask = ref.unpack_masks(words, 18, x.dtype).reshape(w.shape)
        return torch.nn.functional.conv2d(x, w * mask, b, stride=(1, 2), padding=(0, 1), groups=2)

    out, (gx, gw, gb) = _grads(f, (x, w, bias), g)
    exact, (ex, ew, eb) = _grads(formula, (x.double(), w.double(), bias.double()), g.double())
    for a, b in ((out, exact), (gx, ex), (gw, ew), (gb, eb)):
        _check(a, b, dtype)


# --------------------------------------------------------------------------------------
# many tasks
# --------------------------------------------------------------------------------------
def _alphas(tasks, seed):
    g = _gen(seed)
    uniform = torch.full((tasks,), 1.0 / tasks)
    distinct = torch.randn(tasks, generator=g)
    with_zeros = torch.where(torch.rand(tasks, generator=g) < 0.4, 0.0, 1.0 / tasks)
    # several groups of equal values (some large enough for the bit-sliced counter), plus singles
    groups = torch.tensor([0.5, -0.25, 0.125, 0.0])[torch.randint(0, 4, (tasks,), generator=g)]
    groups[: max(1, tasks // 10)] = torch.randn(max(1, tasks // 10), generator=g)
    return {"uniform": uniform, "distinct": distinct, "with_zeros": with_zeros, "groups": groups}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks,shape", [(1, (3, 33)), (7, (5, 1)), (40, (4, 2, 3, 3)), (300, (6, 100))])
@pytest.mark.parametrize("kind", ["uniform", "distinct", "with_zeros", "groups"])
def test_superpose(backend, dtype, tasks, shape, kind):
    n, k = shape[0], math.prod(shape[1:])
    w, bank = _rand(shape, dtype, 1), _bank(tasks, n, k, 2)
    alpha = _alphas(tasks, 3)[kind].to(dtype)
    g = _rand(shape, dtype, 4)
    out, (gw, _, ga) = _grads(ops.superpose, (w, bank, alpha), g)
    exact, (ew, _, ea) = _exact(ops.superpose, (w, bank, alpha), g)
    # low-precision alphas are exact in the float32 accumulator; tolerances as for the weight
    _check(out, exact, dtype)
    _check(gw, ew, dtype)
    _check(ga, ea, dtype)


def test_superpose_skips_zero_alpha(backend):
    w, bank = _rand((4, 70), torch.float32, 1), _bank(5, 4, 70, 2)
    alpha = torch.tensor([0.0, 0.3, 0.0, 0.3, 0.3])
    only = ops.superpose(w, bank[[1, 3, 4]], alpha[[1, 3, 4]])
    assert torch.equal(ops.superpose(w, bank, alpha), only)
    assert torch.equal(ops.superpose(w, bank, torch.zeros(5)), torch.zeros_like(w))


@pytest.mark.parametrize("dtype", DTYPES)
# tasks x rows reach every CPU path: per-task dots (few tasks), row tiles (R >= 3, T < 64),
# in-lane tables (T >= 16) and byte tables
@pytest.mark.parametrize("tasks", [1, 7, 20, 300])
@pytest.mark.parametrize("v_shape", [(5, 33), (2, 4, 70), (3, 6, 100), (5, 7, 45), (2, 1, 1)])
def test_mask_dots(backend, dtype, tasks, v_shape):
    n, k = v_shape[-2:]
    v, bank = _rand(v_shape, dtype, 1), _bank(tasks, n, k, 2, density=0.3)
    g = _rand((*v_shape[:-2], tasks), dtype, 3)
    out, (gv, _) = _grads(ops.mask_dots, (v, bank), g)
    exact, (ev, _) = _exact(ops.mask_dots, (v, bank), g)
    _check(out, exact, dtype)
    _check(gv, ev, dtype)


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# tasks around the 16-task vectors of the AVX-512 path and its threshold; words per task below,
# across and past the 16-word steps, the 128-word blocks of several rows and the 1024-word blocks of
# one row (37 x 900: 1073 words, a partial last step), with partial words
@pytest.mark.parametrize("tasks", [11, 12, 15, 16, 17, 33, 47, 48, 250])
@pytest.mark.parametrize("v_shape", [(1, 1, 1), (2, 1, 33), (8, 3, 70), (1, 5, 1000), (3, 7, 600), (1, 37, 900)])
def test_mask_dots_avx512(avx512_switch, dtype, tasks, v_shape):
    """The AVX-512 mask_dots (16 tasks a vector) against float64 and the path it replaces; the same bits
    at 1 and 2 threads."""
    _C = avx512_switch
    n, k = v_shape[-2:]
    v, bank = _rand(v_shape, dtype, tasks), _bank(tasks, n, k, 2, density=0.4)
    exact = ref.mask_dots(v.double(), bank)
    before = torch.get_num_threads()
    try:
        results = {}
        for enabled in (True, False):
            _C.set_avx512_enabled(enabled)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[enabled, threads] = ops.mask_dots(v, bank)
    finally:
        torch.set_num_threads(before)
    for out in results.values():
        _check(out, exact, dtype)
    assert torch.equal(results[True, 1], results[True, 2])


def test_mask_dots_is_superpose_gradient(backend):
    # d/dalpha of <g, W * sum_t alpha_t M_t> = mask_dots(g * W)
    w, bank, g = _rand((6, 50), torch.float64, 1), _bank(64, 6, 50, 2), _rand((6, 50), torch.float64, 3)
    alpha = _leaf(torch.full((64,), 1.0 / 64, dtype=torch.float64))
    (ops.superpose(w, bank, alpha) * g).sum().backward()
    _check(alpha.grad, ref.mask_dots(g * w, bank), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,tasks", [(1, 3, 31, 2), (9, 5, 33, 4), (64, 7, 100, 3)])
def test_masked_linear_grouped(backend, dtype, m, n, k, tasks):
    x, w, bank = _rand((m, k), dtype, 1), _rand((n, k), dtype, 2), _bank(tasks, n, k, 3)
    ids = torch.randint(0, tasks, (m,), generator=_gen(4))
    bias, g = _rand((n,), dtype, 5), _rand((m, n), dtype, 6)

    def f(x, w, b):
        return ops.masked_linear_grouped(x, w, bank, ids, b)

    out, (gx, _, gb) = _grads(f, (x, w, bias), g)
    exact, (ex, _, eb) = _exact(f, (x, w, bias), g)
    _check(out, exact, dtype)
    _check(gx, ex, dtype)
    _check(gb, eb, dtype)
    # each row as its own single-task layer
    rows = [ops.masked_linear(x[i : i + 1], w, bank[ids[i]], bias) for i in range(min(m, 9))]
    _check(out[: len(rows)], torch.cat(rows).double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", [((1,), 5, 33), ((2, 3), 7, 100), ((40,), 4, 31)])
def test_masked_linear_seeded(backend, dtype, lead, n, k):
    seed, layer, scale = 1234, base_weights.layer_id_for("fc1"), 0.37
    x, words = _rand((*lead, k), dtype, 1), _bank(1, n, k, 2)[0]
    bias, g = _rand((n,), dtype, 3), _rand((*lead, n), dtype, 4)
    weight = ref.signed_constant(seed, layer, (n, k), gain=scale * math.sqrt(k), dtype=dtype, format_version=1)

    def f(x, b):
        return ops.masked_linear_seeded(x, words, seed, layer, scale, b)

    out, (gx, gb) = _grads(f, (x, bias), g)
    exact, (ex, eb) = _exact(lambda x, b: ops.masked_linear(x, weight.double(), words, b), (x, bias), g)
    _check(out, exact, dtype)
    _check(gx, ex, dtype)
    _check(gb, eb, dtype)


# --------------------------------------------------------------------------------------
# base weights
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(30, 784), (7, 3, 5, 5), (1, 1)])
@pytest.mark.parametrize("seed,layer", [(0, 0), (2**32 - 1, 3), (2**31 + 7, 2**31 - 1)])  # seeds are < 2**32
def test_signed_constant_matches_reference(dtype, shape, seed, layer):
    out = base_weights.signed_constant(seed, layer, shape, dtype=dtype)
    expected = ref.signed_constant(seed, layer, shape, dtype=dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, expected)  # values are +-c, never 0 or NaN: equal means bit-identical
    c = math.sqrt(2.0) / math.sqrt(math.prod(shape[1:]))
    assert set(out.double().unique().tolist()) <= {float(torch.tensor(c).to(dtype)), float(torch.tensor(-c).to(dtype))}


def test_signed_constant_signs_are_balanced_and_layer_specific():
    a = base_weights.signed_constant(1, 1, (256, 256))
    b = base_weights.signed_constant(1, 2, (256, 256))
    assert abs((a > 0).double().mean().item() - 0.5) < 0.01
    assert abs(((a > 0) == (b > 0)).double().mean().item() - 0.5) < 0.01


def test_layer_id_for():
    ids = {name: base_weights.layer_id_for(name) for name in ("fc1", "fc2", "features.0.conv", "")}
    assert ids["fc1"] == zlib.crc32(b"fc1") & 0x7FFFFFFF
    assert len(set(ids.values())) == len(ids)
    assert all(0 <= v < 2**31 for v in ids.values())
    with pytest.raises(SupsupError):
        base_weights.layer_id_for(3)
    with pytest.raises(SupsupError, match="at least 2 dims"):
        base_weights.signed_constant(0, 0, (5,))


# --------------------------------------------------------------------------------------
# registration: opcheck, backend choice
# --------------------------------------------------------------------------------------
def _samples():
    x, w, words = _rand((3, 40), torch.float32, 1), _rand((5, 40), torch.float32, 2), _bank(1, 5, 40, 3)[0]
    bank, bias, g = _bank(6, 5, 40, 4), _rand((5,), torch.float32, 5), _rand((3, 5), torch.float32, 6)
    alpha = torch.full((6,), 0.25)
    conv_w, conv_words = _rand((4, 2, 3, 3), torch.float32, 7), _bank(1, 4, 18, 8)[0]
    ids = torch.tensor([0, 5, 0])
    return {
        "pack_masks": (torch.rand(4, 40) < 0.5,),
        "unpack_masks": (words, 40, torch.float32),
        "apply_mask": (w, words),
        "apply_mask_st": (w, words, _rand((5, 40), torch.float32, 9)),
        "masked_linear": (x, w, words, bias),
        "masked_linear_st": (x, w, words, _rand((5, 40), torch.float32, 9), None),
        "masked_linear_grad_input": (g, w, words),
        "masked_weight_grad": (g, x, w),
        "masked_conv2d": (_rand((1, 2, 5, 5), torch.float32, 10), conv_w, conv_words, None, [1, 1], [1, 1], [1, 1], 1),
        "superpose": (w, bank, alpha),
        "mask_dots": (w, bank),
        "masked_linear_grouped": (x, w, bank, ids, bias),
        "masked_linear_grouped_grad_input": (g, w, bank, ids),
        "masked_linear_seeded": (x, words, 3, 4, 0.5, bias),
    }


@pytest.mark.parametrize("name", sorted(_samples()))
def test_opcheck_public_ops(name):
    args = _samples()[name]
    differentiable = name not in ("pack_masks", "unpack_masks")
    grad_args = tuple(
        _leaf(a) if differentiable and isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    torch.library.opcheck(getattr(torch.ops.supsup_fast, name), grad_args)


@needs_ext
@pytest.mark.parametrize("name", sorted(set(_samples()) - {"apply_mask_st", "masked_linear_st", "masked_conv2d",
                                                          "masked_linear_grouped_grad_input"}))
def test_opcheck_native_ops(name):
    # the private ops have no fake kernels of their own (the public ops carry them)
    torch.library.opcheck(getattr(torch.ops.supsup_fast_C, name), _samples()[name],
                          test_utils=("test_schema", "test_autograd_registration"))


@needs_ext
def test_signed_constant_fill_schema():
    torch.library.opcheck(torch.ops.supsup_fast_C.signed_constant_fill_, (torch.empty(4, 6), 1, 2, 0.5),
                          test_utils=("test_schema", "test_autograd_registration"))
    out = torch.empty(4, 6)
    torch.ops.supsup_fast_C.signed_constant_fill_(out, 1, 2, 0.5)
    assert torch.equal(out, ref.signed_constant(1, 2, (4, 6), gain=0.5 * math.sqrt(6), format_version=1))


@needs_ext
@pytest.mark.parametrize("op", ops.op_names())
def test_cpu_prefers_extension(op):
    # the binarisers' selections are compiled for float32 scores only, the ternary kernels for float32
    f32_only = ("largest_k", "topk_words", "threshold_words", "ternary_linear", "ternary_linear_grad_input")
    compiled = (torch.float32,) if op in f32_only else DTYPES
    for dtype in DTYPES:
        assert ops.choose(op, "cpu", dtype).name == ("cpu_ext" if dtype in compiled else "reference"), dtype


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    w, words, x = _rand((5, 40), torch.float32, 1), _bank(1, 5, 40, 2)[0], _rand((3, 40), torch.float32, 3)
    bank = _bank(4, 5, 40, 4)
    with pytest.raises(SupsupError, match="weight must be a floating tensor"):
        ops.apply_mask(w.to(torch.int32), words)
    with pytest.raises(SupsupError, match="mask_words must be int32"):
        ops.apply_mask(w, words.to(torch.int64))
    with pytest.raises(SupsupError, match=r"mask_words has shape \(5, 1\), expected \[5, 2\]"):
        ops.apply_mask(w, words[:, :1])
    with pytest.raises(SupsupError, match="x dtype torch.float64 != weight dtype torch.float32"):
        ops.masked_linear(x.double(), w, words)
    with pytest.raises(SupsupError, match="last dim must be K=40"):
        ops.masked_linear(x[:, :39], w, words)
    with pytest.raises(SupsupError, match="bias shape"):
        ops.masked_linear(x, w, words, torch.zeros(4))
    with pytest.raises(SupsupError, match=r"bank has shape \(5, 2\), expected \[T, 5, 2\]"):
        ops.superpose(w, words, torch.ones(5))
    with pytest.raises(SupsupError, match=r"alpha has shape \(3,\), expected \[4\]"):
        ops.superpose(w, bank, torch.ones(3))
    with pytest.raises(SupsupError, match="alpha must be floating"):
        ops.superpose(w, bank, torch.ones(4, dtype=torch.int64))
    with pytest.raises(SupsupError, match="mask_dots needs v of shape"):
        ops.mask_dots(w.reshape(1, 1, 5, 40), bank)
    with pytest.raises(SupsupError, match="task id out of range"):
        ops.masked_linear_grouped(x, w, bank, torch.tensor([0, 4, 1]))
    with pytest.raises(SupsupError, match="task_ids must be int32/int64"):
        ops.masked_linear_grouped(x, w, bank, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(SupsupError, match="unpack_masks needs int32 words"):
        ops.unpack_masks(words.float(), 40)
    with pytest.raises(SupsupError, match="cannot hold k=70 bits"):
        ops.unpack_masks(words, 70)
    with pytest.raises(SupsupError, match="at least 2 dims"):
        ops.pack_masks(torch.ones(5, dtype=torch.bool))


@needs_ext
def test_native_checks_name_the_problem():
    C = torch.ops.supsup_fast_C
    w, words = _rand((5, 40), torch.float32, 1), _bank(1, 5, 40, 2)[0]
    with pytest.raises(RuntimeError, match="mask_words must be int32 packed words"):
        C.apply_mask(w, words.to(torch.int64))
    with pytest.raises(RuntimeError, match=r"expected \[T, 5, 2\]"):
        C.superpose(w, words, torch.ones(5))
    with pytest.raises(RuntimeError, match="task id 9 at row 0 is out of range"):
        C.masked_linear_grouped(w[:1], w, words[None], torch.tensor([9]), None)
    with pytest.raises(RuntimeError, match="must be a floating tensor"):
        C.mask_dots(w.to(torch.int32), words[None])


def test_eager_path_follows_the_forced_backend(monkeypatch):
    """The eager path caches its kernel choice; forcing a backend (env var or force_backend)
    must still take effect on the next call, and lifting it must restore the automatic choice."""
    calls = []
    reference = ops.get_backend("reference")
    ref_impl = reference.impls["masked_linear"]

    def spy(*args):
        calls.append(1)
        return ref_impl(*args)

    monkeypatch.setitem(reference.impls, "masked_linear", spy)
    _registry._clear_choice_caches()
    x, w = _rand((3, 40), torch.float32, 1), _rand((5, 40), torch.float32, 2)
    words = _bank(1, 5, 40, 3)[0]
    automatic = ops.choose("masked_linear", "cpu", torch.float32, (x, w, words, None)).name
    ops.masked_linear(x, w, words)
    assert len(calls) == (automatic == "reference")
    monkeypatch.setenv("SUPSUP_FAST_BACKEND", "reference")
    ops.masked_linear(x, w, words)
    assert len(calls) == 1 + (automatic == "reference")
    monkeypatch.delenv("SUPSUP_FAST_BACKEND")
    with ops.force_backend("masked_linear=reference"):
        ops.masked_linear(x, w, words)
    assert len(calls) == 2 + (automatic == "reference")
    ops.masked_linear(x, w, words)
    assert len(calls) == 2 + 2 * (automatic == "reference")


def test_eager_path_leaves_vmap_to_the_dispatcher():
    """Under a functorch transform the eager shortcut must not hand batched tensors to a kernel:
    vmap over masked_linear (inference and training) equals the per-sample loop."""
    xs, w = _rand((3, 2, 40), torch.float32, 4), _rand((5, 40), torch.float32, 5)
    words = _bank(1, 5, 40, 6)[0]
    want = torch.stack([ops.masked_linear(x, w, words) for x in xs])
    torch.testing.assert_close(torch.vmap(lambda x: ops.masked_linear(x, w, words))(xs), want, rtol=0, atol=0)
    s = _rand((5, 40), torch.float32, 7)
    got = torch.vmap(lambda x: ops.masked_linear(x, w, words, scores=s, score_sign=True))(xs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
