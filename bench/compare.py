"""Compare the speed-up ratios of two benchmark runs (same machine, before and after a change).

    python bench/compare.py BEFORE.json AFTER.json [--noise 0.10] [--markdown]

For every case both runs measured, each supsup_fast provider's ratio to each baseline provider
(baseline median time / supsup_fast median time) is computed in each run, and the change of that
ratio (after / before) is printed. Ratios, not times, are compared: load on a shared machine slows
both providers of one run alike. ``--noise`` is the largest change counted as run-to-run noise;
the rows beyond it are flagged, and the exit status is 1 when any ratio fell by more than it.
The noise to use is measured, e.g. by comparing two runs of the same code.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

from report import is_fast, load


def ratios(path: str) -> dict[tuple[str, str, str, str], float]:
    """(family, case, supsup_fast provider, baseline provider) -> baseline time / supsup_fast time."""
    _, results = load(path)
    by_case: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        by_case.setdefault((r.family, r.case), {})[r.provider] = r.time
    out = {}
    for (family, case), times in by_case.items():
        for fast, tf in times.items():
            if not is_fast(fast) or not tf:
                continue
            for base, tb in times.items():
                if not is_fast(base) and tb:
                    out[(family, case, fast, base)] = tb / tf
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--noise", type=float, default=0.10, help="largest ratio change counted as noise (0.10 = 10%%)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    a, b = ratios(args.before), ratios(args.after)
    common = sorted(set(a) & set(b))
    if not common:
        print("the two runs share no (case, provider) pair", file=sys.stderr)
        return 2
    changes = {k: b[k] / a[k] for k in common}
    fell = [k for k in common if changes[k] < 1 - args.noise]
    rose = [k for k in common if changes[k] > 1 + args.noise]
    sep = " | " if args.markdown else "  "
    if args.markdown:
        print("| family | case | supsup_fast | baseline | before | after | after/before |")
        print("|---|---|---|---|---|---|---|")
    for k in common:
        flag = " <- fell" if k in fell else (" <- rose" if k in rose else "")
        cells = [*k, f"{a[k]:.2f}x", f"{b[k]:.2f}x", f"{changes[k]:.3f}{flag}"]
        print(("| " + sep.join(cells) + " |") if args.markdown else sep.join(cells))
    logs = [math.log(changes[k]) for k in common]
    print(f"\n{len(common)} ratios; after/before: geometric mean {math.exp(statistics.fmean(logs)):.3f}, "
          f"median {statistics.median(changes.values()):.3f}, min {min(changes.values()):.3f}, "
          f"max {max(changes.values()):.3f}; {len(fell)} fell and {len(rose)} rose by more than "
          f"{args.noise:.0%}; only in before: {len(set(a) - set(b))}, only in after: {len(set(b) - set(a))}")
    return 1 if fell else 0


if __name__ == "__main__":
    sys.exit(main())
