"""pytest configuration of the throughput suites: sizes, device, parametrisation, fixtures.

``--bench-size tiny`` (default; or env ``SUPSUP_BENCH_SIZE``) keeps every case small: CI runs
``pytest bench --benchmark-disable`` as a correctness smoke test. ``--bench-size full`` gives the
real measurements (``bench/run_cpu.sh``). Device: CUDA when available, else CPU
(``--bench-device`` overrides). The machinery itself lives in ``harness.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import Runner, measure_cpu_roofline, measure_gpu_roofline

import supsup_fast

ENV_SIZE = "SUPSUP_BENCH_SIZE"
SIZES = ("tiny", "full")


# ======================================================================================
# Options and parametrisation
# ======================================================================================
def pytest_addoption(parser):
    group = parser.getgroup("supsup_fast benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=None,
                    help=f"tiny (CI smoke test, default) or full (real measurements); env {ENV_SIZE}")
    group.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device to benchmark on (auto: cuda when available)")


def bench_size(config) -> str:
    size = config.getoption("bench_size") or os.environ.get(ENV_SIZE, "tiny")
    if size not in SIZES:
        raise pytest.UsageError(f"{ENV_SIZE} must be one of {SIZES}, got {size!r}")
    return size


def bench_device(config) -> str:
    dev = config.getoption("bench_device")
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch.cuda.is_available() is False")
    return dev


def pytest_generate_tests(metafunc):
    """A test taking ``case`` and ``provider`` is parametrised by its module's ``params_<name>``.

    ``params_<name>(size, device)`` returns ``[(case, provider), ...]``: the grid depends on the
    size and the device, which are only known once the command line has been read.
    """
    if not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    name = metafunc.function.__name__.removeprefix("test_")
    make = getattr(metafunc.module, f"params_{name}")
    size, device = bench_size(metafunc.config), bench_device(metafunc.config)
    grid = list(make(size, device))
    metafunc.parametrize(
        "case,provider",
        [pytest.param(c, p, id=f"{c.id}-{p}") for c, p in grid],
    )


def pytest_report_header(config):
    return (f"supsup_fast benchmarks: size={bench_size(config)} device={bench_device(config)} "
            f"threads={torch.get_num_threads()} extension={'loaded' if supsup_fast.EXT_LOADED else 'not loaded'}")


def pytest_benchmark_update_machine_info(config, machine_info):
    from harness import machine_info as describe

    machine_info["supsup_fast_bench"] = describe(bench_size(config), bench_device(config))


# ======================================================================================
# Fixtures
# ======================================================================================
@pytest.fixture(scope="session")
def size(request) -> str:
    return bench_size(request.config)


@pytest.fixture(scope="session")
def device(request) -> str:
    return bench_device(request.config)


@pytest.fixture(scope="session")
def roofline(device, request):
    """Copy bandwidth and matmul throughput of this GPU or CPU, measured in this run (``None`` when timing is
    off): each timed case with known bytes / flops records its floor beside its time."""
    if request.config.getoption("benchmark_disable", False):
        return None
    return measure_gpu_roofline() if device == "cuda" else measure_cpu_roofline()


@pytest.fixture(scope="session")
def runner(size, device, roofline, request):
    return Runner(size=size, device=device, roofline=roofline,
                  enabled=not request.config.getoption("benchmark_disable", False))


