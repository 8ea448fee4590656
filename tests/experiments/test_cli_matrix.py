"""Every combination of ``supsup-fast run``'s choices either runs or is refused clearly.

The matrix is generated from the parser itself: every option of the ``run`` subcommand that has
``choices`` is a factor (a choice added to the parser joins the matrix with no edit here). The full
product is too large for CI, so the rows form a pairwise covering array: every pair of values of any
two factors (benchmark x architecture, architecture x scenario, ...) occurs in a row the CLI accepts
whenever any accepted row can hold that pair, and every pair no accepted row can hold occurs in a row
that must be refused. Which rows are accepted is asked of the CLI's own validation, not written here;
rows are picked by new pairs covered per unit of cost, so expensive values (ResNet-18, MNIST-5k's
1000 test images per task, per-example gradient descent) are not stacked in one row.

An accepted row runs a tiny configuration (2 tasks, 2 iterations, 4 evaluation images) to the end
and must leave a complete ``results.json``, a plot and a bank with 2 tasks; a refused row must exit
with status 2 before writing anything, with a message naming at least two flags and no traceback.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from supsup_fast.checkpoint import read_bank_info
from supsup_fast.cli import build_parser
from supsup_fast.errors import SupsupError
from supsup_fast.experiments import experiment

TINY = ["--tasks", "2", "--iterations", "2", "--check-every", "2", "--batch-size", "4", "--eval-images", "4",
        "--test-batch-size", "256", "--no-progress"]
#: rough cost of a value in a tiny run (unlisted values cost 1): only a tie-break of the covering array
COST = {"mnist5k": 3, "resnet18": 4, "fc1024": 2, "gradient_descent": 2, "NNs": 2}


def _run_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices["run"]


def factors() -> dict:
    """``{flag: [argv fragment, ...]}`` for every ``run`` option with choices (``[]``: flag left out)."""
    _, run = _run_parser()
    out = {}
    for action in run._actions:
        if action.choices is None or not action.option_strings:
            continue
        flag = action.option_strings[0]
        many = action.nargs in ("+", "*")
        values = [[flag, str(v)] for v in action.choices]  # argv holds strings (--seed-format: ints)
        if action.default is None or (many and action.default == []) or action.default not in action.choices:
            values.insert(0, [])
        out[flag] = values
    return out


class _Validated(Exception):
    pass


def _accepted(parser, argv) -> tuple[bool, str]:
    """Whether the CLI's validation accepts ``argv`` (nothing runs: ``run`` is replaced by the validation)."""
    def validate_only(cfg, **kwargs):
        cfg.validate()
        raise _Validated

    args = parser.parse_args(argv)
    original = experiment.run
    experiment.run = validate_only
    try:
        try:
            args.func(args)
        except _Validated:
            return True, ""
        return False, ""
    finally:
        experiment.run = original


def matrix(data_root: str, samples: int = 1500, seed: int = 0) -> list[tuple[list, bool]]:
    """``[(argv, accepted)]`` covering the pairs and triples described in the module notes."""
    import contextlib
    import io

    fs = factors()
    names = list(fs)
    parser, _ = _run_parser()
    rng = random.Random(seed)
    sizes = [len(fs[n]) for n in names]
    total = 1
    for s in sizes:
        total *= s
    if total <= samples:
        picks = list(itertools.product(*[range(s) for s in sizes]))
    else:
        picks = [tuple(rng.randrange(s) for s in sizes) for _ in range(samples)]

    def argv_of(pick):
        return ["run", *TINY, "--data-root", data_root, *[a for n, i in zip(names, pick) for a in fs[n][i]]]

    memo = {}

    def pairs(pick):
        if pick not in memo:
            memo[pick] = frozenset((a, pick[a], b, pick[b]) for a, b in itertools.combinations(range(len(names)), 2))
        return memo[pick]

    sink = io.StringIO()
    verdict = {}
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        for pick in set(picks):
            verdict[pick] = _accepted(parser, argv_of(pick))[0]
    good = [p for p in verdict if verdict[p]]
    bad = [p for p in verdict if not verdict[p]]
    wanted = set().union(*(pairs(p) for p in verdict))
    coverable = set().union(*(pairs(p) for p in good))
    def cost(p):  # multiplicative: expensive values are not stacked in one row
        c = 1
        for n, i in zip(names, p):
            c *= COST.get(fs[n][i][-1] if fs[n][i] else None, 1)
        return c

    good.sort(key=cost)  # max() keeps the first of equals: the cheapest
    bad.sort(key=cost)
    rows, covered = [], set()
    # greedy: accepted rows that cover the most uncovered pairs
    while coverable - covered:
        best = max(good, key=lambda p: len(pairs(p) - covered) / cost(p))
        rows.append(best)
        covered |= pairs(best)
    # pairs no accepted row holds: each must be refused somewhere
    refused_pairs = wanted - coverable
    while refused_pairs:
        best = max(bad, key=lambda p: len(pairs(p) & refused_pairs))
        rows.append(best)
        refused_pairs -= pairs(best)
    assert coverable | (wanted - coverable) == wanted
    seen, out = set(), []
    for p in rows:
        if p not in seen:
            seen.add(p)
            out.append((argv_of(p), verdict[p]))
    return out


def _flag_names(text: str) -> set:
    import re

    return set(re.findall(r"--[a-z][a-z0-9-]+", text))


@pytest.fixture(scope="module")
def rows(data_root):
    return matrix(str(data_root))


def test_matrix_covers_every_value_and_pair(rows):
    fs = factors()
    assert {"--benchmark", "--data", "--arch", "--scenario", "--method", "--objective", "--batch-mode",
            "--binariser", "--optimizer", "--compare-methods"} <= set(fs)
    for flag, values in fs.items():
        for v in values:
            if v:
                assert any(argv[i:i + 2] == v for argv, ok in rows if ok for i in range(len(argv))), \
                    f"{' '.join(v)} never runs in the matrix"
    assert any(not ok for _, ok in rows)
    # every pair of benchmark x architecture x scenario values has a row (run, or refused)
    index = {f: {tuple(v): i for i, v in enumerate(fs[f])} for f in ("--benchmark", "--arch", "--scenario")}
    for a, b in itertools.combinations(index, 2):
        for va in fs[a]:
            for vb in fs[b]:
                assert any(_has(argv, va) and _has(argv, vb) for argv, _ in rows), (va, vb)


def _has(argv, fragment) -> bool:
    return any(argv[i:i + len(fragment)] == fragment for i in range(len(argv)))


def test_every_matrix_row_runs_or_is_refused_clearly(rows, tmp_path, capsys):
    from supsup_fast.cli import main

    failures = []
    for i, (argv, ok) in enumerate(rows):
        out = tmp_path / f"row{i}"
        rc = main([*argv, "--out", str(out)])
        captured = capsys.readouterr()
        what = " ".join(argv[len(TINY) + 3:])
        if ok:
            if rc != 0:
                failures.append(f"{what}: exit {rc}: {captured.err[-400:]}")
                continue
            res = json.loads((out / "results.json").read_text())
            assert res["complete"] is True and "resume" not in res, what
            assert len(res["per_task"]) == 2 or res["config"]["scenario"] == "NNs", what
            assert all(0.0 <= p["gg_accuracy"] <= 1.0 for p in res["per_task"]), what
            assert (out / "accuracy_vs_tasks.png").stat().st_size > 1000, what
            masks = res["nns"]["masks_allocated"] if "nns" in res else 2
            assert read_bank_info(out / "bank").num_tasks == masks >= 1, what
            if res["config"]["scenario"] in ("GNs", "GNu"):
                assert res["final"]["tasks"] == 2 and res["final"]["images"] == 8, what
        else:
            named = _flag_names(captured.err)
            if not (rc == 2 and "Traceback" not in captured.err and len(named) >= 2 and not out.exists()):
                failures.append(f"{what}: refused badly (exit {rc}, flags {sorted(named)}): {captured.err[-300:]}")
    assert not failures, "\n".join(failures)


def test_refusals_come_before_any_work(tmp_path, data_root):
    """A refused row fails in validation: the benchmark is never built."""
    parser, _ = _run_parser()
    args = parser.parse_args(["run", "--data", "cifar100", "--benchmark", "permuted", "--data-root", str(data_root)])
    cfg = experiment.ExperimentConfig(benchmark=args.benchmark, data=args.data, data_root=args.data_root,
                                      out_dir=str(tmp_path / "never"))
    built = []
    original = experiment.build_benchmark
    experiment.build_benchmark = lambda c: built.append(c) or original(c)
    try:
        with pytest.raises(SupsupError, match="--benchmark split"):
            experiment.run(cfg)
    finally:
        experiment.build_benchmark = original
    assert built == [] and not (tmp_path / "never").exists()
