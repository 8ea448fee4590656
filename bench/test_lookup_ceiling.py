"""bench/lookup_ceiling.py: the bank's word count and floor as the task-inference benchmark counts them, and a
short run of the compiled probe writing its JSON and table (skipped without a compiler or AVX-512F)."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import lookup_ceiling as lc  # noqa: E402


def test_words_and_floor_follow_the_bank_layout():
    # LeNet-300-100 (100 outputs): rows of ceil(784/32) = 25, ceil(300/32) = 10, ceil(100/32) = 4 words;
    # 2500 tasks are 157 groups of 16 (the last one short)
    assert lc.bank_words16("lenet", 2500) == (300 * 25 + 100 * 10 + 100 * 4) * 157
    assert lc.bank_words16("fc1024", 16) == 1024 * 25 + 1024 * 32 + 100 * 32
    # at 1 GB/s the floor in seconds is the bytes in GB: 2 reads of 8900 words x 4 bytes x T, 2 of the weights
    nk = 300 * 784 + 100 * 300 + 100 * 100
    assert lc.floor_seconds("lenet", 10, 1.0) == pytest.approx((2 * 8900 * 4 * 10 + 2 * 4 * nk) / 1e9)


def test_short_run_writes_result_and_table(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    rc = lc.main(["--words", "200000", "--threads", "2", "--out", str(out)])
    if rc == 3:
        pytest.skip(capsys.readouterr().err.strip())
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["probes"]) == {"1", "2"}
    for p in doc["probes"].values():
        assert p["kernel_mix_ns_per_word"] > 0 and p["lookups_only_ns_per_word"] > 0
    assert {(r["net"], r["T"]) for r in doc["rows"]} == {(n, t) for n in ("lenet", "fc1024") for t in lc.TASKS}
    for r in doc["rows"]:
        # the ratio is the two times' own ratio, and more tasks cost more lookups
        assert r["lookups_over_floor"] == pytest.approx(r["lookups_ms"] / r["floor_ms"])
    by = {(r["net"], r["T"]): r for r in doc["rows"]}
    assert by[("lenet", 2500)]["lookups_ms"] > by[("lenet", 250)]["lookups_ms"]
    table = (tmp_path / "ceiling.md").read_text()
    assert "| lenet-T2500 |" in table and table == capsys.readouterr().out


def test_probe_refuses_bad_arguments(tmp_path):
    try:
        exe = lc.compile_probe(str(tmp_path))
    except lc.Unavailable as e:
        pytest.skip(str(e))
    with pytest.raises(RuntimeError, match="failed"):
        lc.probe(exe, 0, 10)
