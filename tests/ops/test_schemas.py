"""The Python ops (``supsup_fast::``) and the C++ ops they dispatch to (``supsup_fast_C::``, all defined
in csrc/ops.cpp) take the same arguments: names, types, defaults, mutability and returns."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from supsup_fast import ops
from supsup_fast._native import EXT_LOADED

pytestmark = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")
CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


def _cpp_ops() -> list[str]:
    """Every op the extension defines (the dispatcher's own list: ``dir(torch.ops...)`` is lazy)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("supsup_fast_C::")})


def _schema(packet) -> str:
    s = packet.default._schema
    return str(s).split("::", 1)[1]


@pytest.mark.parametrize("name", _cpp_ops())
def test_cpp_schema_equals_python(name):
    py = getattr(torch.ops.supsup_fast, name, None)
    assert py is not None and name in ops.op_names(), f"supsup_fast_C::{name} has no dispatched Python twin"
    assert _schema(getattr(torch.ops.supsup_fast_C, name)) == _schema(py)


def test_every_cpp_schema_is_in_ops_cpp():
    defs = set()
    for path in CSRC.rglob("*.c*"):
        for m in re.finditer(r'm\.def\("([a-z_0-9]+)\(', path.read_text()):
            defs.add((path.name, m.group(1)))
    assert {f for f, _ in defs} == {"ops.cpp"}, sorted(defs)
    assert sorted(n for _, n in defs) == _cpp_ops()
