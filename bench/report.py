"""Turn pytest-benchmark JSON results into markdown tables of ratios, target checks and a plot.

    python bench/report.py bench/results/cpu-amd-epyc-2c/2026-11-22T0400Z.json [more.json ...]
        [--readme README.md] [--no-plot]

For every workload family a table has one row per workload (the benchmark group) and, for each
supsup_fast provider, its time and its speed-up over every baseline measured in the same run
(``baseline time / supsup_fast time``: above 1 means supsup_fast is faster). Task-inference
tables add the memory figures. The targets section states each target as met or not met with
the numbers. With ``--readme`` the text replaces what lies between ``<!-- bench:cpu:begin -->``
and ``<!-- bench:cpu:end -->`` (``gpu`` for CUDA results). A PNG (task-inference latency and
peak memory against T, log scales) is written next to each JSON file.

Times are pytest-benchmark medians on CPU and CUDA-event medians (``extra_info["time_s"]``) on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from typing import Optional

BASELINE_ORDER = ["official", "stack_matvec", "two_pass", "reference", "numpy", "dense"]
FAMILY_ORDER = [
    "task_inference", "task_inference_rows", "mask_dots", "superpose", "masked_linear_fwd", "masked_linear_bwd",
    "masked_conv2d_fwd", "masked_conv2d_bwd", "ternary_linear_fwd", "train_step", "pack_masks", "unpack_masks",
]
FAMILY_TITLE = {
    "task_inference": "One-shot task inference from one image (end to end)",
    "task_inference_rows": "Per-example one-shot task inference of a batch (every row its own gradient)",
    "mask_dots": "mask_dots over every layer (the alpha-gradient)",
    "superpose": "superpose over every layer (W * sum_t alpha_t M_t)",
    "masked_linear_fwd": "masked_linear forward",
    "masked_linear_bwd": "masked_linear forward + backward (to input and scores)",
    "masked_conv2d_fwd": "masked_conv2d forward (3x3, reduced ResNet-18 widths)",
    "masked_conv2d_bwd": "masked_conv2d forward + backward (to input and weight)",
    "ternary_linear_fwd": "One layer over a signed-constant base: dense vs masked vs seed-regenerated (ternary)",
    "train_step": "Training step of one task (RMSprop)",
    "pack_masks": "pack_masks",
    "unpack_masks": "unpack_masks",
}


# ======================================================================================
# Loading
# ======================================================================================
class Result:
    def __init__(self, bench: dict):
        self.info = bench.get("extra_info", {})
        self.group = bench.get("group") or bench["name"]
        self.family = self.info.get("family", self.group.split("[")[0])
        self.case = self.info.get("case", self.group)
        self.provider = self.info.get("provider") or (bench.get("params") or {}).get("provider", bench["name"])
        stats = bench.get("stats") or {}
        self.time = self.info.get("time_s", stats.get("median"))
        self.rounds = stats.get("rounds")
        self.timer = "cuda events" if "time_s" in self.info else (bench.get("options") or {}).get("timer", "?")
        self.threads = self.info.get("threads")


def load(path: str) -> tuple[dict, list[Result]]:
    with open(path) as f:
        data = json.load(f)
    results = [Result(b) for b in data.get("benchmarks", [])]
    return data.get("machine_info", {}), [r for r in results if r.time is not None]


def is_fast(provider: str) -> bool:
    return provider.startswith("supsup_fast")


# ======================================================================================
# Formatting
# ======================================================================================
def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "–"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return str(n)


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "–"
    return f"{r:.3g}×" if r < 100 else f"{r:.0f}×"


def _case_key(case: str):
    """Sort cases naturally (T10 before T250, M1 before M16)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", case)]


def table(family: str, results: list[Result]) -> str:
    by_case: dict[str, dict[str, Result]] = defaultdict(dict)
    for r in results:
        by_case[r.case][r.provider] = r
    providers = {p for d in by_case.values() for p in d}
    fast = sorted(p for p in providers if is_fast(p))
    baselines = [b for b in BASELINE_ORDER if b in providers] + sorted(
        p for p in providers if not is_fast(p) and p not in BASELINE_ORDER)
    head = ["workload"]
    for f in fast:
        head.append(f"{f} time")
        head += [f"vs {b}" for b in baselines]
    head += [f"{b} time" for b in baselines]
    memory = family == "task_inference"
    if memory:
        head += ["bank", "float32 stacks", "peak (supsup_fast)", "peak (official)", "peak ratio"]
    # the machine's floor for the case (bytes over copy bandwidth / flops over matmul speed, measured in the run)
    floors = any("floor_ms" in r.info for r in results if is_fast(r.provider))
    if floors:
        head += ["floor"] + [f"{f} / floor" for f in fast]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in sorted(by_case, key=_case_key):
        row = by_case[case]
        cells = [case]
        for f in fast:
            t = row[f].time if f in row else None
            cells.append(fmt_time(t))
            for b in baselines:
                cells.append(fmt_ratio(row[b].time / t if (t and b in row) else None))
        cells += [fmt_time(row[b].time) if b in row else "–" for b in baselines]
        if memory:
            any_r = next(iter(row.values())).info
            peak_f = next((row[f].info.get("peak_bytes") for f in fast if f in row and "peak_bytes" in row[f].info),
                          None)
            peak_o = row["official"].info.get("peak_bytes") if "official" in row else None
            cells += [fmt_bytes(any_r.get("bank_bytes")), fmt_bytes(any_r.get("stack_bytes")), fmt_bytes(peak_f),
                      fmt_bytes(peak_o), fmt_ratio(peak_o / peak_f if peak_f and peak_o else None)]
        if floors:
            floor = next((row[f].info["floor_ms"] * 1e-3 for f in fast if f in row and "floor_ms" in row[f].info), None)
            cells.append(fmt_time(floor))
            cells += [fmt_ratio(row[f].time / floor if (floor and f in row and row[f].time) else None) for f in fast]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ======================================================================================
# Targets
# ======================================================================================
def _find(results, family, case_re, provider_pred):
    for r in results:
        if r.family == family and re.fullmatch(case_re, r.case) and provider_pred(r.provider):
            yield r


def _best_fast(results, family, case_re):
    cands = list(_find(results, family, case_re, is_fast))
    return min(cands, key=lambda r: r.time) if cands else None


def _one(results, family, case_re, provider):
    return next(_find(results, family, case_re, lambda p: p == provider), None)


def targets(results: list[Result]) -> str:
    rows = []

    def speedup(name, family, case_re, baseline, goal, cmp=">=", provider=None):
        for case in sorted({r.case for r in _find(results, family, case_re, lambda p: True)}, key=_case_key):
            f = (_one(results, family, re.escape(case), provider) if provider
                 else _best_fast(results, family, re.escape(case)))
            b = _one(results, family, re.escape(case), baseline)
            if f is None or b is None:
                rows.append((name, case, "not measured", ""))
                continue
            ratio = b.time / f.time
            if cmp == "<=":  # a cost ratio: supsup_fast time / baseline time
                ratio = f.time / b.time
                ok = ratio <= goal
                what = f"{fmt_ratio(ratio)} the {baseline} time ({fmt_time(f.time)} vs {fmt_time(b.time)})"
            else:
                ok = ratio >= goal
                what = f"{fmt_ratio(ratio)} faster than {baseline} ({fmt_time(f.time)} vs {fmt_time(b.time)})"
            rows.append((name, case, ("met" if ok else "NOT met") + f" (goal {cmp} {goal}×)", f"{what}, {f.provider}"))

    speedup("task inference ≥ 20× official", "task_inference", r"lenet-T250", "official", 20)
    speedup("task inference ≥ 50× official", "task_inference", r"lenet-T2500", "official", 50)
    for r in _find(results, "task_inference", r"lenet-T(250|2500)", is_fast):
        o = _one(results, "task_inference", re.escape(r.case), "official")
        pf, po = r.info.get("peak_bytes"), (o.info.get("peak_bytes") if o else None)
        if pf and po:
            ratio = po / pf
            rows.append(("task inference peak memory ≥ 30× less", r.case,
                         ("met" if ratio >= 30 else "NOT met") + " (goal >= 30×)",
                         f"{fmt_ratio(ratio)} less ({fmt_bytes(pf)} vs {fmt_bytes(po)}), {r.provider}"))
    for r in _find(results, "task_inference", r"(lenet|fc1024)-T2500", is_fast):
        if "floor_ms" in r.info and r.time:
            ratio = r.time / (r.info["floor_ms"] * 1e-3)
            rows.append(("task inference ≤ 1.5× its bandwidth floor", r.case,
                         ("met" if ratio <= 1.5 else "NOT met") + " (goal <= 1.5×)",
                         f"{fmt_ratio(ratio)} the floor ({fmt_time(r.time)} vs {fmt_time(r.info['floor_ms'] * 1e-3)}: "
                         f"the bank read {r.info.get('bank_passes', '?')}× at {r.info['machine_copy_GBps']:.1f} GB/s), "
                         f"{r.provider}"))
    speedup("mask_dots ≥ 50× the float32 stack", "mask_dots", r"lenet-T2500", "official", 50)
    speedup("masked_linear fwd ≥ 1.5× two_pass (M=1)", "masked_linear_fwd", r".*-M1-float32", "two_pass", 1.5)
    speedup("masked_linear fwd ≥ 1.0× two_pass (M=128)", "masked_linear_fwd", r".*-M128-float32", "two_pass", 1.0)
    speedup("train step ≤ 1.5× dense", "train_step", r".*", "dense", 1.5, cmp="<=")
    tern = "supsup_fast[ternary_linear]"
    speedup("ternary layer ≥ 4× dense (M=1)", "ternary_linear_fwd", r"4096x4096-M1-float32", "dense", 4, provider=tern)
    speedup("ternary layer ≥ 1.5× dense (M=1)", "ternary_linear_fwd", r"(1024x784|1024x1024|200x1024)-M1-float32",
            "dense", 1.5, provider=tern)
    speedup("ternary layer ≥ 1× dense (M=1)", "ternary_linear_fwd", r"(300x784|100x300|100x100)-M1-float32", "dense", 1,
            provider=tern)
    speedup("ternary layer ≥ 1× dense (M ≤ 8)", "ternary_linear_fwd", r".*-M[2-8]-float32", "dense", 1, provider=tern)
    if not rows:
        return ""
    out = ["| target | workload | status | measured |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


# ======================================================================================
# Report
# ======================================================================================
def describe(machine: dict) -> str:
    b = machine.get("supsup_fast_bench", {})
    parts = [b.get("device_name") or machine.get("cpu", {}).get("brand_raw", "?")]
    if b.get("device") == "cpu":
        parts.append(f"{b.get('torch_threads')} torch threads / {b.get('cpu_count')} CPUs")
    parts += [f"torch {b.get('torch', '?')}", f"triton {b.get('triton', '?')}", f"size {b.get('size', '?')}",
              b.get("date", "")]
    return ", ".join(str(p) for p in parts if p)


def report(path: str) -> tuple[str, str]:
    """(markdown, section) for one result file; section is ``cpu`` or ``gpu``."""
    machine, results = load(path)
    section = "gpu" if machine.get("supsup_fast_bench", {}).get("device") == "cuda" else "cpu"
    timers = sorted({str(r.timer) for r in results})
    threads = sorted({r.threads for r in results if r.threads is not None})
    out = [f"Measured on {describe(machine)} (`{os.path.basename(path)}`; timer {', '.join(timers)}; "
           f"torch threads {', '.join(map(str, threads))}). Times are medians; ratios are baseline time / "
           "supsup_fast time from the same run: above 1× supsup_fast is faster."]
    t = targets(results)
    if t:
        out += ["", "**Targets**", "", t]
    fams = defaultdict(list)
    for r in results:
        fams[r.family].append(r)
    for fam in sorted(fams, key=lambda f: (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else 99, f)):
        out += ["", f"**{FAMILY_TITLE.get(fam, fam)}**", "", table(fam, fams[fam])]
    return "\n".join(out), section


def plot(path: str) -> Optional[str]:
    """Task-inference latency and peak memory against T (log scales), saved next to ``path``."""
    _, results = load(path)
    ti = [r for r in results if r.family == "task_inference" and "T" in r.info]
    if not ti:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = defaultdict(list)
    mem = defaultdict(list)
    for r in ti:
        series[(r.info.get("net"), r.provider)].append((r.info["T"], r.time))
        kind = "supsup_fast" if is_fast(r.provider) else r.provider
        if r.info.get("peak_bytes"):
            mem[(r.info.get("net"), kind)].append((r.info["T"], r.info["peak_bytes"]))
    for (net, prov), pts in sorted(series.items()):
        pts.sort()
        ax_t.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o",
                  linestyle="-" if is_fast(prov) else "--", label=f"{net} {prov}")
    for (net, kind), pts in sorted(mem.items()):
        pts = sorted(set(pts))
        ax_m.plot([p[0] for p in pts], [p[1] / 1e6 for p in pts], marker="o",
                  linestyle="-" if kind == "supsup_fast" else "--", label=f"{net} {kind}")
    ax_t.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="latency (ms)",
             title="one-shot task inference, one image")
    ax_m.set(xscale="log", yscale="log", xlabel="tasks T", ylabel="peak memory (MB)",
             title="peak resident memory of task inference")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def splice(readme: str, section: str, text: str) -> bool:
    """Replace the text between the section's markers; returns whether the markers were found."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    with open(readme) as f:
        src = f.read()
    i, j = src.find(begin), src.find(end)
    if i < 0 or j < i:
        return False
    with open(readme, "w") as f:
        f.write(src[: i + len(begin)] + "\n" + text.strip() + "\n" + src[j:])
    return True


def compact(path: str) -> None:
    """Drop pytest-benchmark's raw per-round samples (``stats.data``: millions of numbers for
    fast cases) from a result file, keeping every summary statistic; rewritten atomically."""
    with open(path) as f:
        doc = json.load(f)
    for bench in doc.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON files")
    ap.add_argument("--readme", help="splice the tables into this file between the bench markers")
    ap.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    ap.add_argument("--compact", action="store_true",
                    help="first drop the raw per-round samples from the files (summary statistics are kept)")
    args = ap.parse_args(argv)
    sections = defaultdict(list)
    for path in args.results:
        if args.compact:
            compact(path)
        text, section = report(path)
        sections[section].append(text)
        print(f"## {section.upper()}: {os.path.basename(path)}\n\n{text}\n")
        if not args.no_plot:
            png = plot(path)
            if png:
                print(f"plot: {png}\n")
    if args.readme:
        for section, texts in sections.items():
            if not splice(args.readme, section, "\n\n".join(texts)):
                print(f"{args.readme}: markers <!-- bench:{section}:begin/end --> not found; not spliced",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
