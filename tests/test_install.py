"""The install README's set-up leaves: the compiled extension loaded, the console scripts working, the
x86-64 baseline build passing the op and module tests, and the sources lint-clean (ruff, clang-format).

Each check runs what a user would run, in a subprocess. A missing piece skips the test, or fails it under
``SUPSUP_FAST_STRICT_TESTS=1`` (README's test line), see ``_require``."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from _require import missing

from supsup_fast.backends import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _run(cmd, env=None, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _tool(name: str) -> str:
    """The path of console script ``name`` of this environment (or on PATH); skip/fail if it has none."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        missing(f"`{name}` is not installed (pip install -e '.[test]')")
    return str(path)


def test_the_compiled_extension_is_loaded():
    if os.environ.get(_ext.ENV_NO_EXT, "") not in ("", "0"):
        pytest.skip(f"{_ext.ENV_NO_EXT} is set: the reference path serves by request")
    proc = _run([sys.executable, "-m", "supsup_fast", "info", "--require-ext"])
    if proc.returncode != 0:
        missing(f"the compiled extension is not loaded ({_ext.EXT_ERROR}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    assert "compiled extension: loaded" in proc.stdout, proc.stdout


@pytest.mark.parametrize("command", ["run", "hopfield"])
def test_console_script_parses_its_flags(command):
    proc = _run([_tool("supsup-fast"), command, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: supsup-fast {command}"), proc.stdout[:200]


@pytest.mark.slow
def test_the_x86_64_baseline_build_passes_the_op_and_module_tests():
    """Where the AVX2 build serves this run, the baseline build (loaded on CPUs without x86-64-v3) runs the
    op cases and the module tests in a subprocess, selected the way a user would select it."""
    if not _ext.EXT_LOADED:
        missing(f"the compiled extension is not loaded ({_ext.EXT_ERROR})")
    if _ext.EXT_MODULE != "supsup_fast._C_avx2":
        pytest.skip(f"this run already uses the baseline build ({_ext.EXT_MODULE})")
    env = {_ext.ENV_CPU: "baseline"}
    info = _run([sys.executable, "-m", "supsup_fast", "info", "--require-ext"], env=env)
    assert info.returncode == 0 and "loaded (the baseline build)" in info.stdout, info.stdout + info.stderr
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_cases.py", "tests/nn"],
                env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_python_sources_pass_ruff():
    proc = _run([_tool("ruff"), "check", "supsup_fast", "kernels", "tests", "bench"])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_cxx_sources_are_clang_formatted():
    sources = sorted(str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.h", "*.cu", "*.cuh")
                     for p in (ROOT / "csrc").rglob(ext))
    assert sources, "no C++ sources found under csrc/"
    proc = _run([_tool("clang-format"), "--dry-run", "--Werror", *sources])
    assert proc.returncode == 0, proc.stderr[-6000:]
