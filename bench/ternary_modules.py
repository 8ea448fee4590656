"""Whole models in task (GG) inference: seed format 2 (ternary kernel) vs format 1 (masked GEMM) vs dense.

    python bench/ternary_modules.py [--threads 2] [--budget 2] [--rows 1,8,64] [--tasks 250] [--out PATH]

For LeNet-300-100 (784-300-100-10) and FC-1024-1024 (784-1024-1024-100), bias-free as SupSup's, the
same network converted twice (``SupsupConfig(seed_format=1)`` and ``seed_format=2``) with the same
frozen masks, and the dense ``nn.Sequential`` holding format 1's ``W * M`` of that task. Each
provider's output is checked against float64 first; times are interleaved rounds (ternary_table's
``measure``: median, IQR, 10th percentile). The run also reports each converted model's resident
bytes in GG inference after a forward (every buffer and parameter: masks of ``--tasks`` tasks, the
dense base where it is held) and writes ``bench/results/ternary/<machine>/<UTC stamp>-modules-<threads>t.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from harness import device_slug  # noqa: E402
from ternary_table import machine_record, measure  # noqa: E402
from torch import nn  # noqa: E402

import supsup_fast as sf  # noqa: E402
from supsup_fast import SupsupConfig  # noqa: E402

MODELS = {"lenet-300-100": [784, 300, 100, 10], "fc-1024-1024": [784, 1024, 1024, 100]}
PROVIDERS = ["dense", "seed_format_1[masked_linear]", "seed_format_2[ternary_linear]"]
REL_TOL = 1e-5


def mlp(widths) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def converted(widths, version: int, banks: list) -> nn.Module:
    model = sf.convert_(mlp(widths), SupsupConfig(seed_format=version))
    layers = sf.masked_layers(model)
    state = {}
    for (name, m), bank in zip(((n, m) for n, m in model.named_modules() if m in layers), banks):
        state[f"{name}.bank"] = bank
    model.load_state_dict(state, strict=False)
    return model


def resident_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.buffers()) + list(model.parameters()):
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def run(threads: int, budget_s: float, rows, tasks: int) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    results = []
    for name, widths in MODELS.items():
        banks = [torch.randint(-2**31, 2**31, (tasks, b, (a + 31) // 32), generator=g, dtype=torch.int64)
                 .to(torch.int32) for a, b in zip(widths, widths[1:])]
        models = {v: converted(widths, v, banks) for v in (1, 2)}
        t = tasks - 1
        for m in models.values():
            sf.set_task(m, t)
        dense = mlp(widths)
        with torch.no_grad():
            for d, m in zip((x for x in dense if isinstance(x, nn.Linear)), sf.masked_layers(models[1])):
                d.weight.copy_(m.weight * m.task_mask(t))
        w2 = [m.weight.double() * m.task_mask(t).double() for m in sf.masked_layers(models[2])]
        for m in sf.masked_layers(models[2]):
            m._release_weight()  # read above for the check only
        for r in rows:
            x = torch.randn(r, widths[0], generator=g)
            fns = {"dense": lambda x=x: dense(x), "seed_format_1[masked_linear]": lambda x=x: models[1](x),
                   "seed_format_2[ternary_linear]": lambda x=x: models[2](x)}
            with torch.no_grad():
                errs = {}
                for p, fn in fns.items():
                    want = x.double()
                    ws = w2 if p.startswith("seed_format_2") else [d.weight.double() for d in dense
                                                                    if isinstance(d, nn.Linear)]
                    for i, w in enumerate(ws):
                        want = want @ w.t()
                        want = torch.relu(want) if i < len(ws) - 1 else want
                    out = fn()
                    errs[p] = ((out.double() - want).norm() / want.norm()).item()
                    assert errs[p] <= REL_TOL, (name, r, p, errs[p])
                times = measure(fns, budget_s)
            mem = {v: resident_bytes(m) for v, m in models.items()}
            resident = [m.weight_resident for m in sf.masked_layers(models[2])]
            assert not any(resident), resident
            res = {"model": name, "M": r, "tasks": tasks, "providers": times, "max_rel_error": errs,
                   "resident_bytes": {"seed_format_1": mem[1], "seed_format_2": mem[2]},
                   "mask_bytes": sum(b.numel() * 4 for b in banks),
                   "ratio_format1_over_format2": times[PROVIDERS[1]]["median_s"] / times[PROVIDERS[2]]["median_s"],
                   "ratio_dense_over_format2": times[PROVIDERS[0]]["median_s"] / times[PROVIDERS[2]]["median_s"]}
            results.append(res)
            print(f"  {name} M={r}: " + ", ".join(f"{p} {times[p]['median_s'] * 1e6:.1f} us" for p in PROVIDERS),
                  file=sys.stderr)
    return {
        "machine": machine_record(threads),
        "budget_s": budget_s, "results": results,
    }


def render(data: dict) -> str:
    mc = data["machine"]
    out = [f"{mc['cpu_model']}, {mc['threads']} threads, kernel {mc['kernel_isa']}, {mc['date']}, load average "
           f"{mc['loadavg_before'][0]:.1f} at the start. Median us (IQR/median); one frozen task applied (GG).", "",
           "| model | M | dense | format 1 (masked) | format 2 (ternary) | format 1 / format 2 | dense / format 2 "
           "| resident MB format 1 / 2 (masks) |", "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        p = r["providers"]
        cell = [f"{p[k]['median_s'] * 1e6:.1f} ({p[k]['iqr_s'] / p[k]['median_s'] * 100:.0f}%)" for k in PROVIDERS]
        rb = r["resident_bytes"]
        out.append(f"| {r['model']} | {r['M']} | {' | '.join(cell)} | {r['ratio_format1_over_format2']:.2f}x | "
                   f"{r['ratio_dense_over_format2']:.2f}x | {rb['seed_format_1'] / 1e6:.1f} / "
                   f"{rb['seed_format_2'] / 1e6:.1f} ({r['mask_bytes'] / 1e6:.1f}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--tasks", type=int, default=250)
    ap.add_argument("--out")
    ap.add_argument("--render", metavar="JSON")
    a = ap.parse_args()
    if a.render:
        print(render(json.loads(pathlib.Path(a.render).read_text())))
        return
    data = run(a.threads, a.budget, [int(v) for v in a.rows.split(",")], a.tasks)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    out = pathlib.Path(a.out or pathlib.Path(__file__).parent / "results" / "ternary" / device_slug("cpu")
                       / f"{stamp}-modules-{a.threads}t.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(render(data))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
