"""bench/report.py on a committed CPU result file: compacting keeps every summary statistic and
the tables it makes; the README's tables are what the committed file gives."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import pytest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import report  # noqa: E402


def _is_benchmark_file(path: str) -> bool:
    with open(path) as f:
        return bool(json.load(f).get("benchmarks"))


# named by UTC start time: the newest sorts last
RESULTS = sorted((p for p in glob.glob(os.path.join(BENCH_DIR, "results", "cpu-*", "*.json")) if _is_benchmark_file(p)),
                 key=os.path.basename)


@pytest.mark.skipif(not RESULTS, reason="no CPU benchmark results committed")
def test_compact_keeps_statistics_and_tables(tmp_path):
    src = RESULTS[-1]
    raw = tmp_path / "raw.json"
    shutil.copy(src, raw)
    doc = json.loads(raw.read_text())
    doc["benchmarks"][0]["stats"]["data"] = [1.0, 2.0, 3.0]  # raw samples, as pytest-benchmark writes them
    raw.write_text(json.dumps(doc))
    before, _ = report.report(str(raw))
    report.compact(str(raw))
    after = json.loads(raw.read_text())
    assert all("data" not in b["stats"] for b in after["benchmarks"])
    assert [b["stats"]["median"] for b in after["benchmarks"]] == [b["stats"]["median"] for b in doc["benchmarks"]]
    text, section = report.report(str(raw))
    assert section == "cpu" and text == before and "**Targets**" in text


@pytest.mark.skipif(not RESULTS, reason="no CPU benchmark results committed")
def test_readme_cpu_tables_come_from_the_newest_result():
    with open(os.path.join(BENCH_DIR, "..", "README.md")) as f:
        readme = f.read()
    text, _ = report.report(RESULTS[-1])
    assert text in readme


def _bench(family, case, provider, median, **info):
    return {"group": f"{family}[{case}]", "name": f"test_{family}[{case}-{provider}]", "stats": {"median": median},
            "extra_info": {"family": family, "case": case, "provider": provider, **info}}


def test_floor_columns_and_the_bandwidth_target(tmp_path):
    """A run with the CPU roofline: each table gains the floor and every fast provider's time over it, and task
    inference at T = 2500 is held to 1.5x its floor."""
    floor = {"floor_ms": 10.0, "bank_passes": 2, "machine_copy_GBps": 17.8}
    doc = {"machine_info": {}, "benchmarks": [
        _bench("task_inference", "lenet-T2500", "supsup_fast[cpu_ext]", 0.014, **floor),
        _bench("task_inference", "lenet-T2500", "official", 2.0),
        _bench("task_inference", "fc1024-T2500", "supsup_fast[cpu_ext]", 0.020, **floor),
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    _, results = report.load(str(path))
    text = report.table("task_inference", [r for r in results if r.family == "task_inference"])
    head, _, *rows = text.splitlines()
    assert "| floor | supsup_fast[cpu_ext] / floor |" in head
    lenet = next(r for r in rows if r.startswith("| lenet-T2500 "))
    assert lenet.endswith("| 10 ms | 1.4× |"), lenet
    targets = report.targets(results)
    assert "| task inference ≤ 1.5× its bandwidth floor | lenet-T2500 | met (goal <= 1.5×) |" in targets
    assert "| task inference ≤ 1.5× its bandwidth floor | fc1024-T2500 | NOT met (goal <= 1.5×) |" in targets
    assert "the bank read 2× at 17.8 GB/s" in targets
