"""Machinery shared by the throughput suites: cases, timing, correctness checks, metadata.

Every benchmark compares providers on the same work in the same run: ``benchmark.group`` is the
workload (for example ``masked_linear_fwd[lenet.fc1-M1-float32]``), the provider is the
parametrised id (``supsup_fast[cpu_ext]``, ``reference``, ``official``, ``dense``, ``two_pass``...)
and is also written to ``extra_info``. Before a provider is timed its output is checked against
an independent computation of the same quantity, so a run with ``--benchmark-disable`` is a
correctness smoke test.

Timing:
* CPU: pytest-benchmark's own rounds (medians), with the round count capped for slow cases.
* CUDA: inside the benchmark, medians of CUDA-event timings (``triton.testing.do_bench``,
  which flushes L2 before every run), a warm-L2 variant and a CUDA-graph variant for
  launch-bound cases; the GPU's copy bandwidth and a large matmul are measured once per run
  and every result is also given as GB/s, TFLOP/s and percent of its floor.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pytest
import torch

import supsup_fast
from supsup_fast import ops, testing
from supsup_fast.info import avx512_gemm_state, cpu_model
from supsup_fast.testing import rel_error


# ======================================================================================
# Machine description (pytest-benchmark's machine_info)
# ======================================================================================
def device_slug(device: str) -> str:
    """``cpu-amd-epyc-2c`` / ``cuda-nvidia-h100-80gb-hbm3``: the results folder of a machine."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*|\d+-core", "", cpu_model().lower())
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-") + f"-{os.cpu_count()}c"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - triton is optional on CPU
        triton_version = f"not importable ({type(e).__name__})"
    return {"torch": torch.__version__, "triton": triton_version, "supsup_fast": supsup_fast.__version__}


# ======================================================================================
# Cases
# ======================================================================================
@dataclass
class Case:
    """One workload: its group name, the shared inputs' builder, and a description for the report.

    ``build()`` makes the inputs once per group (every provider of the group sees the same
    tensors); ``params`` go to ``extra_info`` so the report can tabulate by them.
    """

    family: str  # masked_linear_fwd, superpose, task_inference, ...
    id: str  # the parametrisation id, e.g. "lenet.fc1-M1-float32"
    params: dict
    build: Callable[[], dict]
    bytes: Optional[float] = None  # fewest bytes the work must move (roofline), if meaningful
    flops: Optional[float] = None

    @property
    def group(self) -> str:
        return f"{self.family}[{self.id}]"

    def __repr__(self) -> str:  # shows in pytest's failure output
        return f"Case({self.group})"


# ======================================================================================
# Timing and checking
# ======================================================================================
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tolerance(dtype: torch.dtype, device: str, terms: Optional[int] = None) -> float:
    """The project's tolerance for a ``dtype`` result summing ``terms`` products (:mod:`supsup_fast.testing`);
    fp32 dots on GPUs run in tf32."""
    return testing.tolerance(dtype, tf32=device == "cuda", terms=terms)


def check_outputs(outs, expected, device: str, what: str, tol: Optional[float] = None) -> list[float]:
    """Every output tensor (or int) equals its expected counterpart within the dtype's tolerance."""
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(outs) == len(expected), f"{what}: {len(outs)} outputs, expected {len(expected)}"
    errs = []
    for i, (o, e) in enumerate(zip(outs, expected)):
        if not isinstance(e, torch.Tensor):
            assert o == e, f"{what}: output {i} is {o}, expected {e}"
            continue
        assert tuple(o.shape) == tuple(e.shape), (
            f"{what}: output {i} has shape {tuple(o.shape)}, expected {tuple(e.shape)}")
        if not e.is_floating_point():
            assert torch.equal(o.cpu(), e.cpu()), f"{what}: output {i} ({o.dtype}) differs from the expected values"
            errs.append(0.0)
            continue
        err = rel_error(o, e)
        limit = tol if tol is not None else tolerance(o.dtype, device)
        assert err <= limit, f"{what}: output {i} relative error {err:.3g} > {limit:.3g}"
        errs.append(err)
    return errs


def _do_bench(fn, flush: bool) -> float:
    """Median milliseconds of ``fn`` by CUDA events; ``flush`` empties L2 before every run."""
    import triton.testing

    if flush:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    # no flush: time back-to-back launches with events around each
    start = [torch.cuda.Event(enable_timing=True) for _ in range(50)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(50)]
    for _ in range(10):
        fn()
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return times[len(times) // 2]


def _do_bench_graph(fn) -> Optional[float]:
    """Median milliseconds per call replaying ``fn`` from a CUDA graph (launch overhead removed)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - graphs do not capture ops that sync or allocate on host
        return None


def measure_gpu_roofline() -> dict:
    """Copy bandwidth (read + write bytes / s) and dense matmul throughput, measured now."""
    import triton.testing

    nbytes = 1 << 30
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=200, return_mode="median") * 1e-3
    bw = 2 * nbytes / t
    a = b = None  # frees the buffers (the timed lambda still names them)
    out = {"copy_GBps": bw / 1e9, "device_name": torch.cuda.get_device_name()}
    for dtype, n in ((torch.bfloat16, 8192), (torch.float32, 4096)):
        x = torch.randn(n, n, device="cuda", dtype=dtype)
        y = torch.randn(n, n, device="cuda", dtype=dtype)
        t = triton.testing.do_bench(lambda: x @ y, warmup=10, rep=100, return_mode="median") * 1e-3
        out[f"matmul_TFLOPs_{str(dtype).removeprefix('torch.')}"] = 2 * n**3 / t / 1e12
    torch.cuda.empty_cache()
    return out


def copy_bandwidth(nbytes: int, repeats: int = 9) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second, as STREAM's Copy counts them) of a buffer
    of ``nbytes``: the best of ``repeats`` timings (what the machine can do; other processes only slow it)."""
    a = torch.empty(nbytes // 4).uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    inner = max(1, (64 << 20) // nbytes)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            b.copy_(a)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * nbytes / min(times) / 1e9


def measure_cpu_roofline() -> dict:
    """This CPU's copy bandwidth over 256 MiB (far beyond any cache: the memory's speed) and float32 matmul
    throughput (2048^3), with the torch threads the benchmarks use, measured now (best of several)."""
    out = {"copy_GBps": copy_bandwidth(256 << 20), "threads": torch.get_num_threads()}
    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    out["matmul_TFLOPs_float32"] = 2 * n**3 / best / 1e12
    return out


def roofline_floor(case: "Case", roofline: Optional[dict], dtype: str = "float32") -> Optional[float]:
    """The fewest seconds ``case`` can take on a machine of ``roofline``: its bytes over the copy bandwidth or
    its flops over the matmul throughput, whichever is longer; ``None`` where neither is known."""
    if roofline is None or (case.bytes is None and case.flops is None):
        return None
    floor = 0.0
    if case.bytes is not None:
        floor = max(floor, case.bytes / (roofline["copy_GBps"] * 1e9))
    if case.flops is not None:
        peak = roofline.get(f"matmul_TFLOPs_{dtype}", roofline.get("matmul_TFLOPs_bfloat16"))
        if peak:
            floor = max(floor, case.flops / (peak * 1e12))
    return floor or None


@dataclass
class Runner:
    size: str
    device: str
    roofline: Optional[dict]
    enabled: bool
    cpu_budget_s: float = 1.5  # wall time spent timing one slow CPU case
    _inputs: dict = field(default_factory=dict)  # group -> inputs (only the current group is kept)
    _expected: dict = field(default_factory=dict)  # (group, key) -> expected outputs

    def inputs(self, case: Case) -> dict:
        """The group's shared inputs, built once; the previous group's are released first."""
        if case.group not in self._inputs:
            self._inputs.clear()
            self._expected = {k: v for k, v in self._expected.items() if k[0] == case.group}
            torch.manual_seed(0)
            self._inputs[case.group] = case.build()
        return self._inputs[case.group]

    def expected(self, case: Case, key: str, compute: Callable[[], object]):
        k = (case.group, key)
        if k not in self._expected:
            with torch.no_grad():
                self._expected[k] = compute()
        return self._expected[k]

    def run(
        self,
        benchmark,
        case: Case,
        provider: str,
        fn: Callable[[], object],
        expected: Optional[Callable[[], object]] = None,
        expected_key: str = "default",
        context: Optional[contextlib.AbstractContextManager] = None,
        check: Optional[Callable[[object], object]] = None,
        tol: Optional[float] = None,
        dtype: Optional[torch.dtype] = None,
        graph: bool = True,
        extra: Optional[dict] = None,
    ):
        """Check ``fn``'s output, then time it as ``provider`` in ``case``'s group.

        ``check(out)`` maps an output to what is compared (default: the output itself);
        ``expected()`` computes the comparison target once per group and key.
        """
        benchmark.group = case.group
        info = benchmark.extra_info
        info.update(family=case.family, case=case.id, provider=provider, **case.params)
        info.update(threads=torch.get_num_threads(), device=self.device, size=self.size, **versions())
        if extra:
            info.update(extra)
        with context if context is not None else contextlib.nullcontext():
            out = fn()
            synchronize(self.device)
            if expected is not None:
                want = self.expected(case, expected_key, expected)
                got = check(out) if check is not None else out
                errs = check_outputs(got, want, self.device, f"{provider} on {case.group}", tol)
                info["max_rel_error"] = max(errs, default=0.0)
            del out
            if self.device == "cuda":
                self._time_cuda(benchmark, case, fn, info, graph)
            else:
                self._time_cpu(benchmark, fn)
                if self.enabled and self.roofline is not None:
                    self._record_floor(case, benchmark.stats.stats.median, info)

    def _record_floor(self, case: Case, seconds: float, info: dict) -> None:
        """The machine's roofline and this case's floor beside its time (``pct_of_floor``: 100 = at the floor)."""
        info.update({f"machine_{k}": v for k, v in self.roofline.items()})
        dtype = str(case.params.get("dtype", "bfloat16" if self.device == "cuda" else "float32"))
        floor = roofline_floor(case, self.roofline, dtype)
        if floor is not None and seconds > 0:
            info["floor_ms"] = floor * 1e3
            info["pct_of_floor"] = 100.0 * floor / seconds

    def _time_cpu(self, benchmark, fn):
        if not self.enabled:
            benchmark(fn)
            return
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        if once < 0.02:
            # pytest-benchmark calibrates iterations per round and takes >= 5 rounds within max_time
            benchmark(fn)
        else:
            rounds = max(3, min(50, int(self.cpu_budget_s / once)))
            benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)

    def _time_cuda(self, benchmark, case, fn, info, graph):
        if not self.enabled:
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
            return
        flushed = _do_bench(fn, flush=True)
        warm = _do_bench(fn, flush=False)
        graphed = _do_bench_graph(fn) if graph else None
        info.update(time_ms=flushed, time_ms_warm_l2=warm, time_ms_cuda_graph=graphed,
                    timer="cuda events (triton.testing.do_bench, L2 flushed, median)")
        t = flushed * 1e-3
        if case.bytes is not None:
            info["GBps"] = case.bytes / t / 1e9
        if case.flops is not None:
            info["TFLOPs"] = case.flops / t / 1e12
        if self.roofline is not None:
            self._record_floor(case, t, info)
        # pytest-benchmark's own rounds time host-synchronised calls; the report uses time_s
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, iterations=1)
        benchmark.extra_info["time_s"] = t


# ======================================================================================
# Small helpers the suites share
# ======================================================================================
def fast_backends(op: str, device: str, dtype: Optional[torch.dtype] = torch.float32) -> list[str]:
    """Backends (besides ``reference``) that serve ``op`` on ``device``; ``["reference"]`` if none."""
    names = [b.name for b in ops.backends()
             if b.name != "reference" and b.static_decline(op, device, dtype) is None]
    return names or ["reference"]


def sf(backend: str) -> str:
    return f"supsup_fast[{backend}]"


def backend_of(provider: str) -> Optional[str]:
    m = re.fullmatch(r"supsup_fast\[(.+)\]", provider)
    return m.group(1) if m else None


def free_memory_bytes() -> int:
    """Memory available to allocate now (Linux MemAvailable; a large number elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def require_memory(nbytes: float, device: str, what: str) -> None:
    """Skip (with the numbers) when ``nbytes`` would not fit with a margin: building a float stack
    has temporaries, and on CPU a fresh memory-probe process runs beside the one holding it."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
    else:
        free = free_memory_bytes()
    if nbytes * 1.25 + 2 * 2**30 > free:
        pytest.skip(f"{what} needs {nbytes / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free")


def words_like(shape: Sequence[int], k: int, device: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random packed mask words of ``shape`` (last dim = words of a row of ``k`` bits), padding zero."""
    words = torch.randint(-(2**31), 2**31, tuple(shape), dtype=torch.int64, generator=generator).to(torch.int32)
    r = k % 32
    if r:
        words[..., -1] &= (1 << r) - 1
    return words.to(device)


def machine_info(size: str, device: str) -> dict:
    """What a result file needs to say about the machine and the software."""
    return {
        "size": size,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "device_slug": device_slug(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "extension_loaded": supsup_fast.EXT_LOADED,
        "cpu_avx512_gemm": avx512_gemm_state(),
        "backends": [b.name for b in ops.backends() if b.available],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **versions(),
    }
