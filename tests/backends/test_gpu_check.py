"""``bench/gpu_check.sh --dry-run``: the GPU machine's script runs end to end on a CPU.

The script is run for real on a GPU only when one is lent (minutes at a time), so CI runs its dry
run: the same steps, the roofline's CPU dry run, the GPU tests and suites collected. What comes
back from the GPU machine is limited to 8 files, so the file count is checked too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from supsup_fast.backends import gpu_dispatch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()), files
    assert len(files) <= 8, f"more than 8 files would not come back: {files}"
    assert {"env.txt", "summary.txt", "kernels.json", "dispatch.json", "tests.xml", "logs.tar.gz"} <= set(files)

    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["complete"] and kernels["dry_run"] and not kernels["errors"], kernels["errors"]
    measured = {r["kernel"] for r in kernels["results"]}
    assert {"masked_linear_fwd", "masked_linear_dX", "superpose", "mask_dots", "pack_masks(bool)"} <= measured
    assert all(r["us"] > 0 and "pct_of_copy" in r for r in kernels["results"])

    with pytest.raises(ValueError, match="dry run"):
        gpu_dispatch.load_table(out / "dispatch.json")  # never mistaken for a GPU measurement
    table = gpu_dispatch.load_table(out / "dispatch.json", allow_dry_run=True)  # the format it reads
    assert set(table["classes"]["masked_linear"]) and all(
        {"fused", "two_pass"} <= set(row) for row in table["classes"]["masked_linear"].values())

    summary = (out / "summary.txt").read_text()
    for step in ("roofline: ok", "tests: rc=0", "bench: rc=0", "total:"):
        assert step in summary, summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/roofline.log", "logs/tests.log", "logs/bench.log"} <= names, names
    tests_log = (out / "summary.txt").read_text()
    assert "collected" in tests_log  # the GPU test selection is non-empty and imports


def test_roofline_budget_stops_cleanly(tmp_path):
    """A spent budget ends the roofline with its JSON written and marked incomplete, rc 0."""
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "roofline.py"), "--dry-run", "--budget", "0",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert not rep["complete"] and "budget" in rep["stopped"]
