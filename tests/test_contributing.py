"""CONTRIBUTING.md stays true: every path it names exists, and its "adding an op" checklist names each
piece the registry-coverage test (tests/ops/test_cases.py) requires of an op."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "CONTRIBUTING.md").read_text()


def test_every_path_it_names_exists():
    paths = set(re.findall(r"`((?:supsup_fast|csrc|kernels|tests|bench)/[A-Za-z0-9_./<>{},*-]+)`", TEXT))
    assert paths
    missing = []
    for p in paths:
        p = p.rstrip("/")
        if "<" in p or "*" in p:  # a pattern: its folder must exist
            p = p.split("<")[0].split("*")[0].rstrip("/")
        if "{" in p:
            head, alts = p.split("{", 1)
            alts = alts.rstrip("}").split("}")[0].split(",")
            suffix = p.split("}", 1)[1] if "}" in p else ""
            candidates = [head + a + suffix for a in alts]
        else:
            candidates = [p]
        missing += [c for c in candidates if not (ROOT / c).exists()]
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {sorted(missing)}"


def test_adding_an_op_names_what_the_coverage_test_checks():
    section = TEXT.split("## Adding an op", 1)[1].split("\n## ", 1)[0]
    for piece in ("define(", "fake", "backends/reference.py", "OP_CASES", "tests/ops/test_cases.py",
                  "csrc/ops.cpp", "tests/ops/test_schemas.py", "opcheck"):
        assert piece in section, f"the 'adding an op' checklist does not mention {piece!r}"
