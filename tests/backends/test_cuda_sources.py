"""The CUDA sources compile for sm_90 with plain nvcc (no torch, no GPU needed).

``csrc/cuda/*.cu`` and ``*.cuh`` are written against raw pointers so this is a real compile
check on any machine with nvcc; the hash shared by host and device code is also run on the host
against the reference. The torch binding (``ops_binding.cpp``) needs a CUDA build of torch and
is compiled by ``setup.py`` on GPU machines (``bench/gpu_check.sh``); here its kernels' C++
signatures are checked against the CPU kernels' (a mismatch aborts the extension's import).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from supsup_fast import reference as ref

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
FLAGS = ["-arch=sm_90", "-std=c++17", "-O3", "-Xcompiler", "-Wall", "-Werror", "all-warnings"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_sources_are_torch_free():
    sources = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh"))
    assert sources, "no CUDA sources found"
    for path in sources:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.name} includes a torch header ({banned})"


@needs_nvcc
def test_every_cu_file_compiles_for_sm90(tmp_path):
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources

    def compile_one(src: Path):
        return src.name, _run([NVCC, "-c", *FLAGS, str(src), "-o", str(tmp_path / (src.stem + ".o"))])

    with ThreadPoolExecutor(max_workers=max(2, len(sources))) as pool:
        results = list(pool.map(compile_one, sources))
    failures = {name: p.stderr[-3000:] for name, p in results if p.returncode != 0}
    assert not failures, failures
    warnings = {name: p.stderr for name, p in results if "warning" in p.stderr.lower()}
    assert not warnings, warnings


_HOST_PROGRAM = r"""
#include <cstdio>
#include "supsup_cuda.cuh"
int main() {
  const long long seeds[][2] = {%s};
  for (const auto& s : seeds) std::printf("%%u\n", supsup_cuda::layer_key(s[0], s[1]));
  for (unsigned i = 0; i < 64; ++i) std::printf("%%u\n", supsup_cuda::hash32(i * 2654435761u) & 1u);
  return 0;
}
"""

CASES = [(0, 0), (1, 2), (1234, 7), (2**32 - 1, 2**31 + 5), (-7, 11), (2**40 + 3, -1)]


@needs_nvcc
def test_host_hash_matches_reference(tmp_path):
    src = tmp_path / "hash_check.cu"
    src.write_text(_HOST_PROGRAM % ", ".join(f"{{{s}LL, {l}LL}}" for s, l in CASES))
    exe = tmp_path / "hash_check"
    built = _run([NVCC, "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(src), "-o", str(exe)])
    assert built.returncode == 0, built.stderr[-3000:]
    out = _run([str(exe)])
    assert out.returncode == 0, out.stderr
    values = [int(v) for v in out.stdout.split()]
    assert values[: len(CASES)] == [ref.layer_key(s, l) for s, l in CASES]
    idx = (torch.arange(64, dtype=torch.int64) * 2654435761) & 0xFFFFFFFF
    assert values[len(CASES):] == (ref.hash32(idx) & 1).tolist()


def _signatures(text: str) -> dict[str, tuple[str, list[str]]]:
    """``name -> (return type, [parameter types])`` for the C++ functions declared or defined in ``text``."""
    import re

    sigs = {}
    for ret, name, params in re.findall(r"^\s*(at::Tensor|void)\s+(\w+)\(([^)]*)\)\s*[;{]", text, flags=re.M):
        types = []
        for p in filter(None, (q.strip() for q in params.split(","))):
            types.append(" ".join(p.rsplit(None, 1)[0].replace("&", " & ").split()))
        sigs[name] = (ret, types)
    return sigs


def test_cuda_kernels_match_cpu_signatures():
    """Every dispatch key of an op must register the same C++ signature, or loading the extension aborts."""
    import re

    binding = (CUDA_DIR / "ops_binding.cpp").read_text()
    cpu_header = ROOT / "csrc" / "cpu" / "ops.h"
    if not cpu_header.exists():
        pytest.skip("csrc/cpu/ops.h not present")
    cuda_sigs = _signatures(binding)
    cpu_sigs = _signatures(cpu_header.read_text())
    registered = re.findall(r'm\.impl\("(\w+)",\s*&(\w+)\)', binding)
    assert registered, "ops_binding.cpp registers no CUDA kernels"
    for op, fn in registered:
        assert fn in cuda_sigs, f"{fn} not found in ops_binding.cpp"
        if op in cpu_sigs:
            assert cuda_sigs[fn] == cpu_sigs[op], f"{op}: CUDA {cuda_sigs[fn]} != CPU {cpu_sigs[op]}"
