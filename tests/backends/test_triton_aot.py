"""Every Triton kernel compiles ahead of time for sm_90 (H100/H200) as real launches compile it.

:mod:`supsup_fast.kernels.aot` compiles each kernel with the specialisations a real launch gets
(16-byte divisibility of pointers and of N/K/words-per-row/split lengths) and reads the cubin's
resource usage and SASS with ``cuobjdump``. Here, for every autotuning config x fp16/bf16/fp32:

* a config the autotuner keeps (its shared-memory estimate fits) compiles to at most 227 KiB of
  shared memory and spills nothing (LOCAL = 0); the default (first) config is kept for every dtype,
  so ``SUPSUP_FAST_AUTOTUNE=0`` always launches;
* fp16/bf16 matmuls reach the Hopper tensor cores (HGMMA in the SASS);
* the weight mask costs at most 3 SASS instructions per weight element in the main loop (the
  instructions :func:`supsup_fast.kernels.aot.unpack_instructions` attributes to it: 2.0 for 16-bit
  weights, about 2 for fp32), and the main loop's instruction count per weight element does not
  regress past the numbers tracked in ``bench/results/offline-sm90/triton-<version>.json`` for the
  installed Triton (``mask_alu_per_weight`` there is the upper bound: every SHF/PRMT/LOP3/SEL).

Compiles run in a process pool, all cases at once (about 2-4 s each).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("ahead-of-time compilation needs TRITON_INTERPRET unset", allow_module_level=True)

from supsup_fast.kernels import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACKED = ROOT / "bench" / "results" / "offline-sm90" / f"triton-{triton.__version__}.json"
MASK_ALU_LIMIT = 3.0  # SASS integer instructions per weight to test its bit and zero it
REGRESSION = 1.10  # tracked loop instructions per weight may grow by at most 10%


def _work() -> list[tuple[str, str, int]]:
    """(case, dtype, config index) of every launchable combination."""
    out = []
    for case in aot.cases():
        for dtype in case.dtypes:
            for i, config in enumerate(case.configs_for(dtype)):
                if aot.launchable(case, config, dtype):
                    out.append((case.name, str(dtype).replace("torch.", ""), i))
    return out


def _analyse(item):
    name, dtype, i = item
    case = {c.name: c for c in aot.cases()}[name]
    dt = getattr(torch, dtype)
    return item, aot.analyse(case, case.configs_for(dt)[i], dt)


@pytest.fixture(scope="module")
def records() -> dict:
    work = _work()
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(_analyse, work))


def _key(rec: dict) -> str:
    return json.dumps([rec["kernel"], rec["dtype"], rec["config"]], sort_keys=True)


def test_default_config_is_launchable_for_every_dtype():
    for case in aot.cases():
        for dtype in case.dtypes:
            assert aot.launchable(case, case.configs_for(dtype)[0], dtype), f"{case.name} {dtype}: default pruned"


def test_every_launchable_config_fits_and_does_not_spill(records):
    bad = [(k, r["shared_bytes"], r["local_bytes"]) for k, r in records.items()
           if r["shared_bytes"] > aot.SMEM_LIMIT or r["local_bytes"] != 0 or r["stack_bytes"] != 0]
    assert not bad, f"(case, dtype, config): shared bytes, spill bytes: {bad}"


def test_matmuls_use_tensor_cores(records):
    cases = {c.name: c for c in aot.cases()}
    missing = [k for k, r in records.items()
               if aot.tensor_cores_expected(cases[k[0]], getattr(torch, k[1])) and not r["hgmma"]]
    assert not missing, f"no HGMMA in {missing}"


def test_unpack_costs_at_most_3_instructions_per_weight(records):
    measured = {k: r["unpack_per_weight"] for k, r in records.items()
                if r.get("unpack_per_weight") is not None and "seeded" not in k[0] and r["dtype"] != "float64"}
    assert measured, "no kernel's unpack was found in its SASS"
    over = {k: v for k, v in measured.items() if not 0 < v <= MASK_ALU_LIMIT}
    assert not over, f"unpack instructions per weight outside (0, {MASK_ALU_LIMIT}]: {over}"


def test_loop_instructions_do_not_regress(records):
    if not TRACKED.exists():
        pytest.skip(f"no tracked numbers for triton {triton.__version__} ({TRACKED.name})")
    tracked = {_key(r): r for r in json.loads(TRACKED.read_text())["records"]}
    worse, missing = [], []
    for k, r in records.items():
        t = tracked.get(_key(r))
        if t is None:
            missing.append(k)
        elif r.get("loop_instr_per_weight") and r["loop_instr_per_weight"] > REGRESSION * t["loop_instr_per_weight"]:
            worse.append((k, t["loop_instr_per_weight"], r["loop_instr_per_weight"]))
    assert not missing, f"not in {TRACKED.name} (regenerate it with python -m supsup_fast.kernels.aot): {missing}"
    assert not worse, f"loop instructions per weight grew (tracked, now): {worse}"


def test_seeded_weights_are_hashed_not_loaded():
    """The signed constant is made from integer ops on uint32 (the lowbias32 multiplies), no load."""
    case = {c.name: c for c in aot.cases()}["signed_constant"]
    ptx = aot.compile_case(case, None, torch.float32).asm["ptx"]
    assert "2146121005" in ptx or "0x7feb352d" in ptx.lower()
    assert "ld.global" not in ptx, "the signed constant must not read any weight"
