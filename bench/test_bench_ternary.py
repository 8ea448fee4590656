"""Ternary layers: one SupSup layer over a signed-constant base against the dense layer it replaces.

Group ``ternary_linear_fwd[<N>x<K>-M<m>-float32]``; providers and their checks are in
ternary_cases.py (dense F.linear, ops.masked_linear, ops.masked_linear_seeded, the ternary kernel
on seed formats 2 and 1). CPU only (the ternary kernel is a CPU kernel). extra_info records each
provider's fewest bytes, the machine's copy bandwidth measured once in this run (a 256 MB buffer:
DRAM; an 8 MB one: last-level cache) and the bytes / bandwidth floor, and, for the ternary kernel,
its table lookups per nanosecond. ``bench/ternary_table.py`` runs the same providers interleaved
round by round and prints the table.
"""

from __future__ import annotations

import pytest
import ternary_cases as tc
from harness import Case, copy_bandwidth

from supsup_fast import ternary


def params_ternary_linear_fwd(size, device):
    if device != "cpu":
        return []
    shapes, rows = (tc.TINY_SHAPES, tc.TINY_ROWS) if size == "tiny" else (tc.FULL_SHAPES, tc.FULL_ROWS)
    for n, k in shapes:
        for m in rows:
            case = Case(
                family="ternary_linear_fwd", id=f"{n}x{k}-M{m}-float32",
                params={"layer": tc.layer_name(n, k), "N": n, "K": k, "M": m, "dtype": "float32"},
                # no Case.bytes: each provider's floor (its own fewest bytes) is recorded by the test as floor_s
                build=lambda n=n, k=k, m=m: tc.build(n, k, m),
            )
            for p in tc.PROVIDERS:
                yield case, p


@pytest.fixture(scope="module")
def bandwidths(size):
    if size == "tiny":
        return {"copy_GBps_dram": copy_bandwidth(8 << 20, repeats=3), "copy_GBps_llc": None}
    return {"copy_GBps_dram": copy_bandwidth(256 << 20), "copy_GBps_llc": copy_bandwidth(8 << 20)}


def test_ternary_linear_fwd(benchmark, runner, case, provider, bandwidths):
    d = runner.inputs(case)
    n, k, m = case.params["N"], case.params["K"], case.params["M"]
    nbytes = tc.fewest_bytes(provider, n, k, m)
    extra = {"bytes": nbytes, "kernel_isa": ternary.kernel_isa(), **bandwidths,
             "floor_s": nbytes / (bandwidths["copy_GBps_dram"] * 1e9)}
    if provider.startswith("supsup_fast[ternary"):
        extra["table_lookups"] = tc.table_lookups(n, k, m)
    fn = tc.provider_fn(provider, d)
    runner.run(benchmark, case, provider, fn, expected=lambda: tc.expected(provider, d),
               expected_key=provider, tol=tc.REL_TOL, extra=extra)
