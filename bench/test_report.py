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
