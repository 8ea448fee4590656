"""Kernel roofline on one GPU, providers side by side:

    python bench/gpu/roofline.py --out kernels.json [--dispatch dispatch.json] [--budget 140]
    python bench/gpu/roofline.py --dry-run --out kernels.json   # the same flow on the CPU, tiny shapes

Measured in one run: the device-to-device copy bandwidth and a large bf16 matmul (the ceilings),
then every kernel next to its baselines: dense cuBLAS (``F.linear`` on the unmasked weight),
``two_pass`` = ``ops.apply_mask`` + ``F.linear`` (the real mask pass, not the reference's
int64 unpack), and the float32 ``[T, ...]`` mask stack of the original SupSup code. Every
provider's output is checked against a float32 reference before it is timed; a provider that is
wrong is recorded as such and not timed. Times are medians of ``triton.testing.do_bench``
(CUDA events, L2 flushed before every run); launch-bound SupSup-sized shapes are also timed as
CUDA-graph replays. For every row: kernel time, GB/s for the fewest bytes the op must move,
``pct_of_copy`` (that GB/s over the copy bandwidth measured above) and the floor time.

The JSON is rewritten after every measurement (an interrupted run keeps what it measured; SIGINT
stops it cleanly, ``--budget`` stops starting new measurements after that many seconds). With
``--dispatch`` the per-class medians of the competing providers are written as a
:mod:`supsup_fast.backends.gpu_dispatch` table. ``--dry-run`` runs on the CPU with tiny shapes and the
CPU backends standing in for the GPU providers, so CI checks this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from supsup_fast import ops
from supsup_fast import reference as ref
from supsup_fast.backends import gpu_dispatch

RTOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class Budget(Exception):
    """Raised when the time budget is spent: stop starting measurements."""


class Run:
    def __init__(self, args):
        self.dry = args.dry_run
        self.dev = "cpu" if self.dry else "cuda"
        self.out = args.out
        self.dispatch_out = args.dispatch
        self.deadline = None if args.budget is None else time.monotonic() + args.budget
        self.report = {"device": None, "results": [], "errors": [], "dry_run": self.dry, "complete": False}
        self.classes: dict = {}  # op -> class -> provider -> summed us (shapes where every candidate ran)

    # ---- bookkeeping ---------------------------------------------------------------------
    def write(self) -> None:
        for path, obj in ((self.out, self.report), (self.dispatch_out, self.dispatch_table())):
            if path:
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    json.dump(obj, f, indent=1, default=_finite)
                os.replace(tmp, path)

    def dispatch_table(self) -> dict:
        return {"format": gpu_dispatch.FORMAT, "device": self.report["device"], "dry_run": self.dry,
                "torch": torch.__version__, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "unit": "sum of median microseconds over the shapes of the class", "classes": self.classes}

    def check_budget(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Budget()

    def sync(self) -> None:
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def bench(self, fn, graph: bool = False) -> float:
        """Median milliseconds of ``fn`` (``graph``: of a CUDA-graph replay of it)."""
        self.check_budget()
        if self.dry:
            fn()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return 1e3 * sorted(times)[len(times) // 2]
        import triton.testing

        if graph:
            fn()  # compile / tune outside the capture
            self.sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        else:
            run = fn
        return float(triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median"))

    def record(self, kernel, provider, shape, dtype, ms, nbytes, flops=None, **extra) -> dict:
        copy = self.report.get("copy_GBps")
        gbps = nbytes / ms / 1e6
        row = {"kernel": kernel, "provider": provider, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
               "us": 1e3 * ms, "GBps": gbps, "bytes": nbytes, **extra}
        if copy:
            row["pct_of_copy"] = 100.0 * gbps / copy
            row["floor_us"] = 1e3 * nbytes / (copy * 1e6)
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
        self.report["results"].append(row)
        self.write()
        pct = f"{row['pct_of_copy']:5.1f}% of copy" if "pct_of_copy" in row else ""
        print(f"{kernel:24s} {provider:12s} {str(tuple(shape)):24s} {row['dtype']:8s} {row['us']:9.1f} us "
              f"{gbps:8.0f} GB/s {pct} " + " ".join(f"{k}={v:.3g}" for k, v in extra.items()
                                                  if isinstance(v, float)), flush=True)
        return row

    def class_time(self, op, args, times: dict) -> None:
        """Add the candidates' times (us) of one shape to its dispatch class."""
        klass = gpu_dispatch.shape_class(op, args)
        row = self.classes.setdefault(op, {}).setdefault(klass, {})
        for provider, us in times.items():
            row[provider] = row.get(provider, 0.0) + us
        self.write()

    def error(self, what: str, exc: BaseException) -> None:
        self.report["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"ERROR {what}: {exc}", file=sys.stderr, flush=True)
        self.write()

    def checked(self, name, fn, want, dtype, exact: bool = False) -> bool:
        """Run ``fn`` once and compare with ``want``; a wrong or failing provider is not timed."""
        try:
            out = fn()
            self.sync()
        except Exception as e:  # a provider that declines or breaks: recorded, not timed
            self.error(f"{name} failed", e)
            return False
        if exact:
            if not torch.equal(out, want):
                self.error(f"{name} wrong", ValueError("output differs from the reference"))
                return False
            return True
        err = _rel(out, want)
        if not err <= RTOL.get(dtype, 1e-5) * (5 if name.startswith(("mask_dots", "superpose")) else 1):
            self.error(f"{name} wrong", ValueError(f"relative error {err:.2e}"))
            return False
        return True


def _finite(o):
    return None if isinstance(o, float) and not math.isfinite(o) else str(o)


def _rel(out, want) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def _available(name: str) -> bool:
    b = {b.name: b for b in ops.backends()}.get(name)
    return b is not None and b.available


# ======================================================================================
# Suites
# ======================================================================================
def ceilings(run: Run) -> None:
    if run.dry:
        n, mm = 1 << 20, 256
    else:
        n, mm = 1 << 28, 8192  # 1 GiB of fp32; an 8192^3 bf16 product
    src = torch.empty(n, dtype=torch.float32, device=run.dev).normal_()
    dst = torch.empty_like(src)
    ms = run.bench(lambda: dst.copy_(src))
    run.report["copy_GBps"] = 2 * src.numel() * 4 / ms / 1e6
    src = dst = None  # frees the buffers (the timed lambda still names them)
    dt = torch.float32 if run.dry else torch.bfloat16
    a = torch.randn(mm, mm, dtype=dt, device=run.dev)
    b = torch.randn(mm, mm, dtype=dt, device=run.dev)
    ms = run.bench(lambda: a @ b)
    run.report["matmul_TFLOPs"] = 2 * mm**3 / ms / 1e9
    run.write()
    print(f"{run.report['device']}: copy {run.report['copy_GBps']:.0f} GB/s, "
          f"matmul {run.report['matmul_TFLOPs']:.1f} TFLOP/s", flush=True)


def _fused_linear(run: Run):
    """The fused masked matmuls themselves (not through the dispatch table)."""
    if run.dry:
        return ops.masked_linear, ops.masked_linear_grad_input
    from supsup_fast.kernels import masked_matmul as mm

    return mm.masked_linear, mm.masked_linear_grad_input


def linear_suite(run: Run) -> None:
    big = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096), (1024, 4096, 4096),
           (4096, 4096, 4096)]
    supsup = [(128, 300, 784), (128, 100, 300), (128, 1024, 1024), (1, 300, 784)]
    if run.dry:
        big, supsup = [(1, 64, 96), (16, 64, 96), (80, 64, 96)], [(8, 30, 40)]
    dt = torch.float32 if run.dry else torch.float16
    fused_fwd, fused_dx = _fused_linear(run)
    for m, n, k in big + supsup:
        x = torch.randn(m, k, dtype=dt, device=run.dev)
        w = torch.randn(n, k, dtype=dt, device=run.dev)
        words = ref.pack_masks(torch.rand(n, k, device=run.dev) < 0.5)
        g = torch.randn(m, n, dtype=dt, device=run.dev)
        s = x.element_size()
        nbytes = s * (m * k + m * n) + (s + 1 / 8) * n * k
        graph = (m, n, k) in supsup and not run.dry
        want_y = ref.masked_linear(x.float(), w.float(), words)
        want_dx = ref.masked_linear_grad_input(g.float(), w.float(), words)
        providers = {
            "fused": (lambda: fused_fwd(x, w, words), lambda: fused_dx(g, w, words)),
            "two_pass": (lambda: F.linear(x, ops.apply_mask(w, words)), lambda: g @ ops.apply_mask(w, words)),
        }
        dense_fwd = run.bench(lambda: F.linear(x, w))
        dense_dx = run.bench(lambda: g @ w)
        run.record("dense_linear_fwd", "cublas", (m, n, k), dt, dense_fwd, s * (m * k + m * n + n * k), 2 * m * n * k)
        fwd_times, dx_times = {}, {}
        for name, (fwd, dx) in providers.items():
            if run.checked(f"masked_linear {name} {(m, n, k)}", fwd, want_y, dt):
                ms = run.bench(fwd)
                fwd_times[name] = 1e3 * ms
                extra = {"x_dense": ms / dense_fwd}
                if graph:
                    extra["graph_us"] = 1e3 * run.bench(fwd, graph=True)
                run.record("masked_linear_fwd", name, (m, n, k), dt, ms, nbytes, 2 * m * n * k, **extra)
            if run.checked(f"masked_linear_dX {name} {(m, n, k)}", dx, want_dx, dt):
                ms = run.bench(dx)
                dx_times[name] = 1e3 * ms
                run.record("masked_linear_dX", name, (m, n, k), dt, ms, nbytes, 2 * m * n * k, x_dense=ms / dense_dx)
        if len(fwd_times) == len(providers):
            run.class_time("masked_linear", (x,), fwd_times)
        if len(dx_times) == len(providers):
            run.class_time("masked_linear_grad_input", (g,), dx_times)


def seed_v2_weight(seed, layer, n, k, scale, device):
    """Seed format 2's ``+-scale`` weight (``S(n, j) = H(R(n) ^ C(j))``, supsup_fast.seed_format)."""
    from supsup_fast.kernels.masked_matmul import seed_v2_keys

    kr, kc = seed_v2_keys(seed, layer)
    rows = ref.hash32(torch.arange(n, device=device) ^ kr)
    cols = ref.hash32(torch.arange((k + 31) // 32, device=device) ^ kc)
    words = ref.hash32(rows[:, None] ^ cols[None, :])
    bits = ((words[:, :, None] >> torch.arange(32, device=device)) & 1).reshape(n, -1)[:, :k].bool()
    c = torch.tensor(scale, dtype=torch.float32, device=device)
    return torch.where(bits, c, -c)


def seeded_suite(run: Run) -> None:
    shapes = [(1, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096)] if not run.dry else [(1, 64, 96)]
    dt = torch.float32 if run.dry else torch.float16
    for m, n, k in shapes:
        x = torch.randn(m, k, dtype=dt, device=run.dev)
        w = torch.randn(n, k, dtype=dt, device=run.dev)
        words = ref.pack_masks(torch.rand(n, k, device=run.dev) < 0.5)
        want = ref.masked_linear_seeded(x.float(), words, 1, 2, 0.01)
        dense = run.bench(lambda: F.linear(x, w))
        s = x.element_size()
        times = {}
        for backend in (("cpu_ext",) if run.dry else ("cuda", "triton")):
            if not _available(backend):
                continue
            with ops.force_backend(f"masked_linear_seeded={backend}"):
                fn = lambda: ops.masked_linear_seeded(x, words, 1, 2, 0.01)  # noqa: E731
                if not run.checked(f"masked_linear_seeded {backend} {(m, n, k)}", fn, want, dt):
                    continue
                ms = run.bench(fn)
            times[backend] = 1e3 * ms
            run.record("masked_linear_seeded", backend, (m, n, k), dt, ms, s * (m * k + m * n) + n * k / 8,
                       2 * m * n * k, speed_vs_dense=dense / ms)
        if {"cuda", "triton"} <= set(times):
            run.class_time("masked_linear_seeded", (x,), times)
        if not run.dry:  # seed format 2: one hash per 32 weights, only the mask bits are read
            from supsup_fast.kernels.masked_matmul import ternary_linear

            want2 = ref.masked_linear(x.float(), seed_v2_weight(1, 2, n, k, 0.01, x.device), words)
            fn = lambda: ternary_linear(x, words, 1, 2, 0.01)  # noqa: E731
            if run.checked(f"ternary_linear v2 {(m, n, k)}", fn, want2, dt):
                ms = run.bench(fn)
                run.record("ternary_linear_v2", "triton", (m, n, k), dt, ms, s * (m * k + m * n) + n * k / 8,
                           2 * m * n * k, speed_vs_dense=dense / ms)


def bank_suite(run: Run) -> None:
    shapes = [(250, 300, 784), (2500, 300, 784), (250, 1024, 1024), (2500, 1024, 1024), (16, 4096, 4096)]
    if run.dry:
        shapes = [(6, 30, 40)]
    dt = torch.float32 if run.dry else torch.float16
    backends = ("cpu_ext",) if run.dry else ("cuda", "triton")
    for t, n, k in shapes:
        w = torch.randn(n, k, dtype=dt, device=run.dev)
        bank = ref.pack_masks(torch.rand(t, n, k, device=run.dev) < 0.5)
        alphas = {"superpose": torch.rand(t, device=run.dev),
                  "superpose_equal_alpha": torch.full((t,), 1.0 / t, device=run.dev)}
        v = torch.randn(n, k, dtype=dt, device=run.dev)
        s = w.element_size()
        stack = ref.unpack_masks(bank, k, torch.float32) if t * n * k * 4 <= (4 << 30) else None
        for label, alpha in alphas.items():
            want = ref.superpose(w.float(), bank, alpha)
            base = None if stack is None else run.bench(lambda: w * (alpha[:, None, None] * stack).sum(0).to(w.dtype))
            times = {}
            for b in backends:
                if not _available(b):
                    continue
                with ops.force_backend(f"superpose={b}"):
                    fn = lambda: ops.superpose(w, bank, alpha)  # noqa: E731
                    if not run.checked(f"{label} {b} {(t, n, k)}", fn, want, dt):
                        continue
                    ms = run.bench(fn)
                times[b] = 1e3 * ms
                extra = {} if base is None else {"speedup_vs_fp32_stack": base / ms}
                run.record(label, b, (t, n, k), dt, ms, t * n * k / 8 + 2 * s * n * k, **extra)
            if label == "superpose" and {"cuda", "triton"} <= set(times):
                run.class_time("superpose", (w, bank), times)
        want = ref.mask_dots(v.float(), bank)
        times = {}
        for b in backends:
            if not _available(b):
                continue
            with ops.force_backend(f"mask_dots={b}"):
                fn = lambda: ops.mask_dots(v, bank)  # noqa: E731
                if not run.checked(f"mask_dots {b} {(t, n, k)}", lambda: fn().float(), want, dt):
                    continue
                ms = run.bench(fn)
            times[b] = 1e3 * ms
            run.record("mask_dots", b, (t, n, k), dt, ms, t * n * k / 8 + s * n * k)
        if {"cuda", "triton"} <= set(times):
            run.class_time("mask_dots", (v, bank), times)
        stack = None


def bits_suite(run: Run) -> None:
    shape = (16, 4096, 4096) if not run.dry else (2, 30, 70)
    masks = torch.rand(*shape, device=run.dev) < 0.5
    k = shape[-1]
    words = ref.pack_masks(masks)
    nbytes = masks.numel() * 9 / 8
    pack_t, unpack_t = {}, {}
    for b in (("cpu_ext",) if run.dry else ("cuda", "triton")):
        if not _available(b):
            continue
        with ops.force_backend(f"pack_masks={b},unpack_masks={b}"):
            if run.checked(f"pack_masks {b}", lambda: ops.pack_masks(masks), words, None, exact=True):
                ms = run.bench(lambda: ops.pack_masks(masks))
                pack_t[b] = 1e3 * ms
                run.record("pack_masks(bool)", b, shape, torch.bool, ms, nbytes)
            if run.checked(f"unpack_masks {b}", lambda: ops.unpack_masks(words, k), masks, None, exact=True):
                ms = run.bench(lambda: ops.unpack_masks(words, k))
                unpack_t[b] = 1e3 * ms
                run.record("unpack_masks(bool)", b, shape, torch.bool, ms, nbytes)
    if {"cuda", "triton"} <= set(pack_t):
        run.class_time("pack_masks", (masks,), pack_t)
    if {"cuda", "triton"} <= set(unpack_t):
        run.class_time("unpack_masks", (words,), unpack_t)


def grouped_suite(run: Run) -> None:
    shapes = [(256, 1024, 1024, 8), (4096, 4096, 4096, 16)] if not run.dry else [(20, 30, 40, 3)]
    dt = torch.float32 if run.dry else torch.float16
    for m, n, k, t in shapes:
        x = torch.randn(m, k, dtype=dt, device=run.dev)
        w = torch.randn(n, k, dtype=dt, device=run.dev)
        bank = ref.pack_masks(torch.rand(t, n, k, device=run.dev) < 0.5)
        ids = torch.randint(0, t, (m,), device=run.dev)
        g = torch.randn(m, n, dtype=dt, device=run.dev)
        want = ref.masked_linear_grouped(x.float(), w.float(), bank, ids)
        want_dx = ref.masked_linear_grouped_grad_input(g.float(), w.float(), bank, ids)
        s = x.element_size()
        nbytes = s * (m * k + m * n + n * k) + t * n * k / 8
        dense = run.bench(lambda: F.linear(x, w))
        fwd = lambda: ops.masked_linear_grouped(x, w, bank, ids)  # noqa: E731
        if run.checked(f"masked_linear_grouped {(m, n, k, t)}", fwd, want, dt):
            ms = run.bench(fwd)
            run.record("masked_linear_grouped", ops.choose("masked_linear_grouped", run.dev, dt, (x,)).name,
                       (m, n, k, t), dt, ms, nbytes, 2 * m * n * k, x_dense=ms / dense)
        dx = lambda: ops.masked_linear_grouped_grad_input(g, w, bank, ids)  # noqa: E731
        if run.checked(f"masked_linear_grouped dX {(m, n, k, t)}", dx, want_dx, dt):
            ms = run.bench(dx)
            chosen = ops.choose("masked_linear_grouped_grad_input", run.dev, dt, (g,)).name
            run.record("masked_linear_grouped_dX", chosen,
                       (m, n, k, t), dt, ms, nbytes, 2 * m * n * k)


SUITES = (ceilings, linear_suite, seeded_suite, bank_suite, bits_suite, grouped_suite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--dispatch", default=None, help="write the measured dispatch table here")
    p.add_argument("--budget", type=float, default=None, help="seconds after which no new measurement starts")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, CPU backends (checks the script)")
    p.add_argument("--suites", default=None, help="comma-separated suite names (default: all)")
    args = p.parse_args(argv)
    run = Run(args)
    if not run.dry and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    if run.dry:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest and steady on a shared CPU
        run.report["device"] = f"cpu ({platform.machine()}, dry run)"
    else:
        props = torch.cuda.get_device_properties(0)
        run.report.update(device=props.name, sms=props.multi_processor_count)
    try:
        import triton

        run.report["triton"] = triton.__version__
    except Exception as e:  # the dry run needs no triton
        run.report["triton"] = f"not importable ({e})"
    run.report.update(torch=torch.__version__, autotune=os.environ.get("SUPSUP_FAST_AUTOTUNE", "1"),
                      backends=[b.name for b in ops.backends() if b.available])
    run.write()
    wanted = None if args.suites is None else set(args.suites.split(","))
    status = 0
    for suite in SUITES:
        if wanted and suite.__name__ not in wanted:
            continue
        try:
            suite(run)
        except Budget:
            run.report["stopped"] = f"time budget spent before {suite.__name__}"
            print(run.report["stopped"], flush=True)
            break
        except KeyboardInterrupt:
            run.report["stopped"] = f"interrupted in {suite.__name__}"
            run.write()
            print(run.report["stopped"], flush=True)
            return 130
        except Exception as e:  # keep the other suites' numbers
            run.error(f"suite {suite.__name__}", e)
            traceback.print_exc()
            status = 1
        if run.dev == "cuda":
            torch.cuda.empty_cache()
    else:
        run.report["complete"] = True
    run.write()
    print(f"wrote {args.out}" + (f" and {args.dispatch}" if args.dispatch else ""), flush=True)
    return status or (1 if run.report["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
