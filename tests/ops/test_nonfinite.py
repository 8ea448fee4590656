"""One semantics of NaN and Inf for every op on every backend: the reference's (see the docstring of
:mod:`supsup_fast.backends.reference`: a mask selects, everything else is IEEE arithmetic).

Every case of the op case table is run with NaN, +Inf and -Inf written into each floating input in
turn (kept and masked-out positions alike); each backend must give the reference's result exactly
in where it is NaN and where (with which sign) it is infinite, and agree on the finite entries
within the dtype's tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

from supsup_fast import ops, testing

if os.environ.get("TRITON_INTERPRET") == "1":
    # the child process of tests/backends/test_triton_interpret.py: the triton backend serves CPU tensors
    # under Triton's interpreter, so the same cases run on its kernels (priority -1: it is never chosen)
    from supsup_fast.backends.triton import register_triton

    register_triton(devices=("cpu",), priority=-1)

VALUES = (float("nan"), float("inf"), -float("inf"))


def _params():
    out = []
    for case in testing.OP_CASES:
        if case.dtypes is None or case.op.endswith("_"):
            continue
        for backend, device in testing.available_backends(case.op):
            if backend == "reference":
                continue
            b = ops.get_backend(backend)
            for dtype in (torch.float32, torch.bfloat16):
                if dtype in b.op_dtypes.get(case.op, b.dtypes):
                    out.append(pytest.param(case, backend, device, dtype,
                                            id=f"{case.id}-{backend}-{device}-{str(dtype)[6:]}"))
    return out


def _poisoned(args: tuple, which: int, value: float, seed: int, only=None) -> tuple:
    """``args`` with ``value`` written into a few entries of its ``which``-th floating tensor (among the
    entries where ``only`` is true, if given)."""
    out, seen = [], 0
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if seen == which and a.numel():
                a = a.clone()
                flat = a.view(-1)
                idx = torch.randperm(flat.numel(), generator=testing.generator(seed))[: max(1, flat.numel() // 23)]
                if only is not None:
                    allowed = torch.nonzero(only.reshape(-1).cpu()).flatten()
                    pick = torch.randperm(allowed.numel(), generator=testing.generator(seed))
                    idx = allowed[pick[: max(1, allowed.numel() // 5)]]
                flat[idx.to(a.device)] = value
            seen += 1
        out.append(a)
    return tuple(out)


def _conv_weight_positions(args) -> torch.Tensor:
    """The platform convolution's NaN propagation follows its algorithm (a Winograd tile spreads a NaN
    of a kept weight), so for masked_conv2d's weight only masked-out positions are poisoned: none of
    them may reach the output."""
    weight, words = args[1], args[2]
    return ~ops.unpack(words.cpu(), weight.shape)


def _compare(out: torch.Tensor, exact: torch.Tensor, dtype, what: str) -> None:
    out, exact = out.detach().cpu(), exact.detach().cpu()
    if out.dtype in (torch.bool, torch.int32):
        assert torch.equal(out, exact.to(out.dtype)), what
        return
    o, e = out.double(), exact.double()
    assert torch.equal(o.isnan(), e.isnan()), \
        f"{what}: NaN at {int(o.isnan().sum())} entries, reference {int(e.isnan().sum())}"
    assert torch.equal(o == float("inf"), e == float("inf")), f"{what}: +Inf pattern differs"
    assert torch.equal(o == -float("inf"), e == -float("inf")), f"{what}: -Inf pattern differs"
    finite = o.isfinite()
    if finite.any():
        testing.assert_rel_close(out[finite], e[finite], dtype, what=what)


@pytest.mark.parametrize("case,backend,device,dtype", _params())
def test_nonfinite_inputs_follow_the_reference(case, backend, device, dtype):
    base = case.make(dtype, device, 0)
    floats = sum(isinstance(a, torch.Tensor) and a.is_floating_point() for a in base)
    b, ref = ops.get_backend(backend), ops.get_backend("reference")
    for which in range(floats):
        for value in VALUES:
            only = _conv_weight_positions(base) if case.op == "masked_conv2d" and which == 1 else None
            args = _poisoned(base, which, value, seed=which, only=only)
            check = b.checks.get(case.op)
            if check is not None and check(*args) is not None:
                continue
            out = b.impls[case.op](*args)
            ref_args = testing.upcast(tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
            exact = ref.impls[case.op](*ref_args)
            _compare(out, exact, dtype, f"{case.id} input {which} = {value}")
