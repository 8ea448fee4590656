"""bench/compare.py: ratio changes between two runs, and its exit status when a ratio falls."""

from __future__ import annotations

import json
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import compare  # noqa: E402


def _run(path, times: dict) -> str:
    benches = [{"group": "masked_linear_fwd[case]", "name": f"t[{p}]", "stats": {"median": t},
                "extra_info": {"family": "masked_linear_fwd", "case": "case", "provider": p}}
               for p, t in times.items()]
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return str(path)


def test_ratios_are_baseline_over_fast(tmp_path):
    r = compare.ratios(_run(tmp_path / "a.json", {"supsup_fast[cpu_ext]": 1.0, "official": 8.0, "dense": 2.0}))
    assert r == {("masked_linear_fwd", "case", "supsup_fast[cpu_ext]", "official"): 8.0,
                 ("masked_linear_fwd", "case", "supsup_fast[cpu_ext]", "dense"): 2.0}


def test_a_fall_beyond_the_noise_fails_and_load_on_both_providers_does_not(tmp_path, capsys):
    before = _run(tmp_path / "a.json", {"supsup_fast[cpu_ext]": 1.0, "official": 8.0})
    slower_machine = _run(tmp_path / "b.json", {"supsup_fast[cpu_ext]": 2.0, "official": 16.0})
    regressed = _run(tmp_path / "c.json", {"supsup_fast[cpu_ext]": 1.5, "official": 8.0})
    assert compare.main([before, slower_machine, "--noise", "0.05"]) == 0
    assert compare.main([before, regressed, "--noise", "0.05"]) == 1
    assert "<- fell" in capsys.readouterr().out
