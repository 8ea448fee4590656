"""Every dispatched op's case table (:data:`supsup_fast.testing.OP_CASES`) on every backend and device
this machine has, against the reference evaluated in float64 on the same inputs (bit results: exactly).

Adding an op or a backend adds its cases here without editing this file; the coverage test fails
for an op without a reference implementation, a fake kernel or a case.
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
from supsup_fast.ops._define import DEFS


def _params():
    out = []
    for case in testing.OP_CASES:
        for backend, device in testing.available_backends(case.op):
            for dtype in case.dtypes or (None,):
                b = ops.get_backend(backend)
                if dtype is not None and dtype not in b.op_dtypes.get(case.op, b.dtypes):
                    continue
                out.append(pytest.param(case, backend, device, dtype,
                                        id=f"{case.id}-{backend}-{device}-{str(dtype).replace('torch.', '')}"))
    return out


@pytest.mark.parametrize("case,backend,device,dtype", _params())
def test_case(case, backend, device, dtype):
    b = ops.get_backend(backend)
    args = case.make(dtype, device, 0)
    check = b.checks.get(case.op)
    if check is not None and check(*args) is not None:
        pytest.skip(f"{backend} declines: {check(*args)}")
    out, exact = testing.run_case(case, backend, device, dtype)
    if out.dtype in (torch.bool, torch.int32) or case.op.endswith("_"):
        assert out.dtype == exact.dtype and torch.equal(out.cpu(), exact), case.id
    else:
        tf32 = device == "cuda" and dtype == torch.float32
        want_dtype = exact.dtype if dtype is None else dtype
        testing.assert_rel_close(out.cpu(), exact, want_dtype, tf32=tf32, what=case.id)


@pytest.mark.parametrize("op", ops.op_names())
def test_every_op_has_a_reference_a_fake_kernel_and_cases(op):
    assert op in ops.get_backend("reference").impls, f"{op} has no reference implementation"
    cases = testing.cases_of(op)
    assert cases, f"{op} has no case in supsup_fast.testing.OP_CASES"
    case = cases[0]
    dtype = None if case.dtypes is None else torch.float32
    args = case.make(dtype, "cpu", 0)
    # the fake kernel exists and agrees with the real one on shape, dtype and strides
    torch.library.opcheck(getattr(torch.ops.supsup_fast, op), args, test_utils=("test_schema", "test_faketensor"))


def test_every_op_of_the_namespace_is_defined_through_define():
    names = {n for n in dir(torch.ops.supsup_fast) if not n.startswith("_") and n not in ("name",)}
    assert set(DEFS) <= names
    assert set(ops.op_names()) <= set(DEFS)
