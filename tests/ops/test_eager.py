"""The eager entries (``csrc/eager.cpp``): a plain float32 CPU call of ``ternary_linear`` or
``masked_linear`` in one native call, every other call the checked way.

* an entry's result is bit-identical to its kernel's (it is the same kernel);
* it declines (returns ``None``) whatever it does not serve: tensors with autograd to record,
  subclasses, other dtypes, bad scalars, arguments its kernel refuses, dispatch modes, vmap,
  CPU autocast, torch.jit.trace;
* the ops use an entry only where the registry picks its backend (a forced backend is obeyed),
  and calls it declines still get the checked path's clear errors, gradients and autocast casts.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from supsup_fast import SupsupError, ops, reference, ternary
from supsup_fast._native import _C, EXT_LOADED
from supsup_fast.ops import _registry

pytestmark = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")


def _ternary_args(bias=True):
    g = torch.Generator().manual_seed(31)
    x = torch.randn(3, 70, generator=g)
    words = reference.pack_masks(torch.rand(37, 70, generator=g) < 0.5)
    b = torch.randn(37, generator=g)
    return [x, words, 20, 3, 0.17, b if bias else None, 2]


def _linear_args(bias=True):
    g = torch.Generator().manual_seed(32)
    x, w = torch.randn(3, 70, generator=g), torch.randn(37, 70, generator=g)
    words = reference.pack_masks(torch.rand(37, 70, generator=g) < 0.5)
    b = torch.randn(37, generator=g)
    return [x, w, words, b if bias else None]


class _Sub(torch.Tensor):
    pass


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


ENTRIES = {  # op -> (entry, kernel, arguments)
    "ternary_linear": (lambda *a: _C.ternary_linear_eager(*a), lambda *a: _C.ternary_linear_cpu(*a), _ternary_args),
    "masked_linear": (lambda *a: _C.masked_linear_eager(*a), lambda *a: _C.masked_linear_cpu(*a), _linear_args),
}


@pytest.mark.parametrize("op", sorted(ENTRIES))
@pytest.mark.parametrize("bias", [True, False])
def test_entry_serves_plain_calls_bit_for_bit(op, bias):
    entry, kern, make = ENTRIES[op]
    args = make(bias)
    with torch.no_grad():
        got = entry(*args)
        assert got is not None and torch.equal(got, kern(*args))
    assert torch.equal(entry(*args), kern(*args))  # grad mode on, nothing requires grad
    if bias:  # a module's bias is a Parameter, a plain tensor too
        bias_at = 5 if op == "ternary_linear" else 3
        args[bias_at] = torch.nn.Parameter(args[bias_at], requires_grad=False)
        assert torch.equal(entry(*args), kern(*args))


@pytest.mark.parametrize("change", [
    "x_requires_grad", "bias_requires_grad", "float64", "subclass", "x_list", "seed_negative", "seed_2_32",
    "seed_bool", "seed_float", "layer_big", "scale_int", "scale_nan", "format_3", "format_bool", "bad_words_shape",
    "words_int64", "bias_shape", "bias_float64", "bias_list",
])
def test_ternary_entry_declines_what_it_does_not_serve(change):
    args = _ternary_args()
    x, words, bias = args[0], args[1], args[5]
    at, value = {
        "x_requires_grad": (0, x.clone().requires_grad_()), "bias_requires_grad": (5, bias.clone().requires_grad_()),
        "float64": (0, x.double()), "subclass": (0, x.as_subclass(_Sub)), "x_list": (0, x.tolist()),
        "seed_negative": (2, -1), "seed_2_32": (2, 1 << 32), "seed_bool": (2, True), "seed_float": (2, 20.0),
        "layer_big": (3, 1 << 40), "scale_int": (4, 1), "scale_nan": (4, math.nan), "format_3": (6, 3),
        "format_bool": (6, True), "bad_words_shape": (1, words[:, :1].contiguous()), "words_int64": (1, words.long()),
        "bias_shape": (5, bias[:5]), "bias_float64": (5, bias.double()), "bias_list": (5, bias.tolist()),
    }[change]
    args[at] = value
    assert _C.ternary_linear_eager(*args) is None


@pytest.mark.parametrize("change", [
    "x_requires_grad", "weight_requires_grad", "bias_requires_grad", "float64", "weight_float64", "subclass",
    "weight_list", "bad_words_shape", "words_int64", "k_mismatch", "bias_shape", "bias_float64", "weight_3d",
])
def test_linear_entry_declines_what_it_does_not_serve(change):
    args = _linear_args()
    x, w, words, bias = args
    at, value = {
        "x_requires_grad": (0, x.clone().requires_grad_()), "weight_requires_grad": (1, w.clone().requires_grad_()),
        "bias_requires_grad": (3, bias.clone().requires_grad_()), "float64": (0, x.double()),
        "weight_float64": (1, w.double()), "subclass": (1, w.as_subclass(_Sub)), "weight_list": (1, w.tolist()),
        "bad_words_shape": (2, words[:, :1].contiguous()), "words_int64": (2, words.long()),
        "k_mismatch": (0, x[:, :69]), "bias_shape": (3, bias[:5]), "bias_float64": (3, bias.double()),
        "weight_3d": (1, w[None]),
    }[change]
    args[at] = value
    assert _C.masked_linear_eager(*args) is None


@pytest.mark.parametrize("op", sorted(ENTRIES))
def test_entries_decline_under_dispatch_modes_autocast_tracing_and_vmap(op):
    entry, _, make = ENTRIES[op]
    args = make()
    with _PassThrough():
        assert entry(*args) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entry(*args) is None
    traced = []

    def record(*tensors):
        traced.append(entry(*tensors, *args[len(tensors):]))
        return tensors[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's own deprecation notice
        torch.jit.trace(record, tuple(args[:2]), check_trace=False)
    assert traced == [None]  # the tracer records only what goes through the dispatcher
    seen = []

    def per_row(x):
        seen.append(entry(x, *args[1:]))
        return x

    torch.func.vmap(per_row)(args[0])
    assert seen == [None]  # a batched tensor is not one the kernel can read


def test_ops_keep_their_semantics_where_entries_decline():
    targs, largs = _ternary_args(), _linear_args()
    rows = torch.func.vmap(lambda x: ternary.ternary_linear(x, *targs[1:]))(targs[0])
    torch.testing.assert_close(rows, ternary.ternary_linear(*targs), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cast like F.linear
        y = ops.masked_linear(*largs)
    assert y.dtype == torch.bfloat16
    x, w, words, b = largs
    x = x.clone().requires_grad_()
    ops.masked_linear(x, w, words, b).sum().backward()
    torch.testing.assert_close(x.grad, (w * reference.unpack_masks(words, 70, w.dtype)).sum(0).expand_as(x))
    with pytest.raises(SupsupError, match="mask_words"):
        ternary.ternary_linear(targs[0], targs[1][:, :1].contiguous(), *targs[2:])
    with pytest.raises(SupsupError, match="seed"):
        ternary.ternary_linear(targs[0], targs[1], -1, *targs[3:])
    with pytest.raises(SupsupError, match="dtype"):
        ops.masked_linear(x.detach(), w.double(), words, b)
    xt = targs[0].clone().requires_grad_()
    ternary.ternary_linear(xt, *targs[1:]).sum().backward()
    assert xt.grad is not None and xt.grad.abs().sum() > 0


@pytest.mark.parametrize("op", sorted(ENTRIES))
def test_ops_use_entries_only_where_the_registry_picks_their_backend(op, monkeypatch):
    entry_fn = {"ternary_linear": _C.ternary_linear_eager, "masked_linear": _C.masked_linear_eager}[op]
    run = {"ternary_linear": lambda a: ternary.ternary_linear(*a), "masked_linear": lambda a: ops.masked_linear(*a)}[op]
    spec = {"ternary_linear": reference.ternary_linear, "masked_linear": reference.masked_linear}[op]
    assert _registry.eager_entry(op) is entry_fn
    calls = []
    monkeypatch.setitem(ops.get_backend("reference").impls, op, lambda *a: calls.append(1) or spec(*a))
    _registry._clear_choice_caches()
    args = ENTRIES[op][2]()
    with ops.force_backend(f"{op}=reference"):
        assert _registry.eager_entry(op) is None
        run(args)
    assert len(calls) == 1
    monkeypatch.setenv("SUPSUP_FAST_BACKEND", "reference")
    assert _registry.eager_entry(op) is None
    run(args)
    assert len(calls) == 2
    monkeypatch.delenv("SUPSUP_FAST_BACKEND")
    assert _registry.eager_entry(op) is entry_fn
    want = run(args)
    assert len(calls) == 2
    torch.testing.assert_close(want, spec(*args), rtol=3e-6, atol=1e-5)


def test_an_op_without_an_entry_has_none():
    assert _registry.eager_entry("mask_dots") is None
    assert _registry.eager_entry("masked_linear") is not None
