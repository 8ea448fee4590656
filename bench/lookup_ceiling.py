"""What the lookups alone would cost in one-shot task inference, set beside its bandwidth floor.

``mask_dots`` (the backward's ``<G * W, M_t>`` over every task) spends one AVX-512 step of 8 (shift,
vpermps, add) per word of 16 tasks. ``lookup_ceiling.cpp`` times that step with its tables in
registers and no memory traffic (a lower bound for the kernel); this script compiles it, runs it
with 1 and with the run's threads, measures the copy bandwidth in the same run and, for LeNet-300-100
and FC-1024-1024 at T = 250 and 2500, prints

    lookups       words of 16 tasks in the bank x ns per word (all threads)
    floor         the bank read twice + the weights, over the copy bandwidth (the task-inference
                  benchmark's floor, ``test_bench_models.py``)
    lookups / floor

A ratio near or above the 1.5x target says the target cannot be reached with this instruction mix
on this machine, whatever the memory does; well below it, the rest of the kernel (transposes, table
loads, the bank's stream) and the rest of the call are what to cut.

    python bench/lookup_ceiling.py [--words N] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import baselines as bl  # noqa: E402
import torch  # noqa: E402
from harness import copy_bandwidth, cpu_model, device_slug, versions  # noqa: E402

from supsup_fast import format as fmt  # noqa: E402

SOURCE = os.path.join(BENCH_DIR, "lookup_ceiling.cpp")
TASKS = (250, 2500)


class Unavailable(RuntimeError):
    """No C++ compiler, or a CPU without AVX-512F: the ceiling cannot be measured here."""


def compile_probe(workdir: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise Unavailable("no C++ compiler (set CXX)")
    exe = os.path.join(workdir, "lookup_ceiling")
    cmd = [cxx, "-O3", "-std=c++17", "-pthread", SOURCE, "-o", exe]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{done.stderr}")
    return exe


def probe(exe: str, threads: int, words: int) -> dict:
    done = subprocess.run([exe, str(threads), str(words)], capture_output=True, text=True)
    if done.returncode == 3:
        raise Unavailable(done.stderr.strip())
    if done.returncode:
        raise RuntimeError(f"{exe} {threads} {words} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def bank_words16(net: str, t: int) -> int:
    """Words of 16 tasks that mask_dots looks up over every layer of ``net`` at ``t`` tasks."""
    return sum(n * fmt.words_per_row(k) for n, k in bl.NETS[net]) * math.ceil(t / 16)


def floor_seconds(net: str, t: int, copy_gbps: float) -> float:
    """The task-inference benchmark's floor: the bank read twice and the float32 weights twice."""
    bank = sum(fmt.packed_nbytes((n, k), t) for n, k in bl.NETS[net])
    nk = sum(n * k for n, k in bl.NETS[net])
    return (2 * bank + 2 * 4 * nk) / (copy_gbps * 1e9)


def run(words: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile_probe(tmp)
        probes = {str(n): probe(exe, n, words) for n in sorted({1, threads})}
    torch.set_num_threads(threads)
    copy = copy_bandwidth(256 << 20)
    ns = probes[str(threads)]["kernel_mix_ns_per_word"]
    rows = []
    for net in bl.NETS:
        for t in TASKS:
            lookups = bank_words16(net, t) * ns * 1e-9
            floor = floor_seconds(net, t, copy)
            rows.append({"net": net, "T": t, "words16": bank_words16(net, t), "lookups_ms": lookups * 1e3,
                         "floor_ms": floor * 1e3, "lookups_over_floor": lookups / floor})
    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
               "device_slug": device_slug("cpu"), "platform": platform.platform(), "loadavg": os.getloadavg(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **versions()}
    return {"machine": machine, "copy_GBps": copy, "probes": probes, "rows": rows}


def markdown(result: dict) -> str:
    m, threads = result["machine"], result["machine"]["threads"]
    p1, pn = result["probes"]["1"], result["probes"][str(threads)]
    lines = [
        f"{m['cpu_model']}, {threads} threads, {m['date']}; copy bandwidth {result['copy_GBps']:.1f} GB/s "
        f"(256 MiB, read + write). One word of 16 tasks: kernel mix (7 shifts + 8 vpermps + 8 adds) "
        f"{p1['kernel_mix_ns_per_word']:.2f} ns on 1 thread, {pn['kernel_mix_ns_per_word']:.2f} ns across "
        f"{threads}; lookups alone (no shifts) {p1['lookups_only_ns_per_word']:.2f} / "
        f"{pn['lookups_only_ns_per_word']:.2f} ns.",
        "",
        "| workload | words of 16 tasks | lookups alone | floor | lookups / floor |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['net']}-T{r['T']} | {r['words16']:,} | {r['lookups_ms']:.2f} ms | {r['floor_ms']:.2f} ms "
                     f"| {r['lookups_over_floor']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--words", type=int, default=50_000_000, help="words of 16 tasks per thread per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", help="write the result as JSON here (and its table beside it as .md)")
    args = ap.parse_args(argv)
    if args.words < 1 or args.threads < 1:
        ap.error("--words and --threads must be positive")
    try:
        result = run(args.words, args.threads)
    except Unavailable as e:
        print(f"lookup ceiling not measured: {e}", file=sys.stderr)
        return 3
    table = markdown(result)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
