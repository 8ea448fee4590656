"""Standalone roofline check of the GPU kernels: ``python bench/gpu/roofline.py OUT.json``.

Measures, in one run on one GPU: device-to-device copy bandwidth and a large bf16 matmul (the two
ceilings), then each kernel on each available GPU backend next to its baselines (dense cuBLAS,
"materialise W*M then matmul", and the float32 ``[T, ...]`` mask stack of the original SupSup
code). Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
run). For every kernel the fewest bytes it must move give a floor time at the measured copy
bandwidth; ``pct_of_floor`` = floor / measured.
"""

from __future__ import annotations

import json
import math
import sys
import traceback

import torch
import torch.nn.functional as F
import triton.testing

from supsup_fast import ops
from supsup_fast import reference as ref

DEV = "cuda"


def bench(fn) -> float:
    """Median milliseconds (L2 flushed before every run)."""
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def available(backend: str) -> bool:
    b = {b.name: b for b in ops.backends()}.get(backend)
    return b is not None and b.available


def ceilings() -> dict:
    n = 1 << 28  # 1 GiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=DEV).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    ms_mm = bench(lambda: a @ b)
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}


def record(results, name, backend, shape, ms, nbytes, copy_gbs, flops=None, **extra):
    floor_ms = nbytes / (copy_gbs * 1e6)
    row = {"kernel": name, "backend": backend, "shape": shape, "ms": ms, "GBps": nbytes / ms / 1e6,
           "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / ms, **extra}
    if flops:
        row["TFLOPs"] = flops / ms / 1e9
    results.append(row)
    print(f"{name:28s} {backend:10s} {str(shape):28s} {ms * 1e3:9.1f} us  {row['GBps']:8.0f} GB/s  "
          f"{row['pct_of_floor']:5.1f}% of floor  " + " ".join(f"{k}={v:.2f}" for k, v in extra.items()))


def linear_suite(results, copy_gbs):
    s = 2
    for m, n, k in [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096),
                    (128, 300, 784), (128, 1024, 1024)]:
        x = torch.randn(m, k, dtype=torch.float16, device=DEV)
        w = torch.randn(n, k, dtype=torch.float16, device=DEV)
        words = ref.pack_masks(torch.rand(n, k, device=DEV) < 0.5)
        g = torch.randn(m, n, dtype=torch.float16, device=DEV)
        nbytes = s * (m * k + m * n) + (s + 1 / 8) * n * k
        dense = bench(lambda: F.linear(x, w))
        two_pass = bench(lambda: F.linear(x, ref.apply_mask(w, words)))
        for backend in ("triton",):
            if not available(backend):
                continue
            with ops.force_backend(f"masked_linear={backend},masked_linear_grad_input={backend}"):
                ms = bench(lambda: ops.masked_linear(x, w, words))
                record(results, "masked_linear_fwd", backend, (m, n, k), ms, nbytes, copy_gbs, 2 * m * n * k,
                       x_dense_cublas=ms / dense, speedup_vs_two_pass=two_pass / ms)
                ms = bench(lambda: ops.masked_linear_grad_input(g, w, words))
                dense_dx = bench(lambda: g @ w)
                record(results, "masked_linear_dX", backend, (m, n, k), ms, nbytes, copy_gbs, 2 * m * n * k,
                       x_dense_cublas=ms / dense_dx)
        if m <= 64:
            for backend in ("triton", "cuda"):
                if not available(backend):
                    continue
                with ops.force_backend(f"masked_linear_seeded={backend}"):
                    try:
                        ms = bench(lambda: ops.masked_linear_seeded(x, words, 1, 2, 0.01))
                    except ops.BackendError:
                        continue
                record(results, "masked_linear_seeded", backend, (m, n, k), ms,
                       s * (m * k + m * n) + n * k / 8, copy_gbs, 2 * m * n * k, x_dense_cublas=ms / dense)


def bank_suite(results, copy_gbs):
    s = 2
    for t, n, k in [(16, 1024, 1024), (250, 1024, 1024), (2500, 300, 784), (64, 4096, 4096)]:
        w = torch.randn(n, k, dtype=torch.float16, device=DEV)
        bank = ref.pack_masks(torch.rand(t, n, k, device=DEV) < 0.5)
        alpha = torch.rand(t, device=DEV)
        alpha_eq = torch.full((t,), 1.0 / t, device=DEV)
        v = torch.randn(n, k, dtype=torch.float16, device=DEV)
        stack = None
        if t * n * k * 4 <= 8 << 30:  # the float32 stack the original code keeps
            stack = ref.unpack_masks(bank, k, torch.float32)
        base_sup = base_dots = None
        if stack is not None:
            base_sup = bench(lambda: w * (alpha[:, None, None] * stack).sum(0).to(w.dtype))

            def stack_dots():
                a = alpha.clone().requires_grad_()
                out = w.float() * (a[:, None, None] * stack).sum(0)
                (g,) = torch.autograd.grad(out, a, v.float())
                return g

            base_dots = bench(stack_dots)
        for backend in ("cuda", "triton"):
            if not available(backend):
                continue
            with ops.force_backend(f"superpose={backend},mask_dots={backend}"):
                for label, a in (("superpose", alpha), ("superpose_equal_alpha", alpha_eq)):
                    ms = bench(lambda: ops.superpose(w, bank, a))
                    extra = {} if base_sup is None else {"speedup_vs_fp32_stack": base_sup / ms}
                    record(results, label, backend, (t, n, k), ms, t * n * k / 8 + 2 * s * n * k, copy_gbs, **extra)
                ms = bench(lambda: ops.mask_dots(v, bank))
                extra = {} if base_dots is None else {"speedup_vs_fp32_stack_autograd": base_dots / ms}
                record(results, "mask_dots", backend, (t, n, k), ms, t * n * k / 8 + s * n * k, copy_gbs, **extra)
        del stack


def bits_suite(results, copy_gbs):
    n, k = 4096, 4096
    masks = torch.rand(16, n, k, device=DEV) < 0.5
    for backend in ("cuda", "triton"):
        if not available(backend):
            continue
        with ops.force_backend(f"pack_masks={backend},unpack_masks={backend}"):
            words = ops.pack_masks(masks)
            ms = bench(lambda: ops.pack_masks(masks))
            record(results, "pack_masks(bool)", backend, tuple(masks.shape), ms, masks.numel() * 9 / 8, copy_gbs)
            ms = bench(lambda: ops.unpack_masks(words, k, torch.bool))
            record(results, "unpack_masks(bool)", backend, tuple(masks.shape), ms, masks.numel() * 9 / 8, copy_gbs)


def main(out_path: str) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": triton.__version__, "backends": [b.name for b in ops.backends() if b.available],
              "results": [], "errors": []}
    report.update(ceilings())
    print(f"{props.name}: copy {report['copy_GBps']:.0f} GB/s, bf16 matmul {report['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    for suite in (linear_suite, bank_suite, bits_suite):
        try:
            suite(report["results"], report["copy_GBps"])
        except Exception:  # keep the other suites' numbers
            report["errors"].append(traceback.format_exc())
            print(report["errors"][-1], file=sys.stderr)
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)
    print(f"wrote {out_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "kernels.json"))
