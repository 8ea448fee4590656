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
    src.write_text(_HOST_PROGRAM % ", ".join(f"{{{s}LL, {layer}LL}}" for s, layer in CASES))
    exe = tmp_path / "hash_check"
    built = _run([NVCC, "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(src), "-o", str(exe)])
    assert built.returncode == 0, built.stderr[-3000:]
    out = _run([str(exe)])
    assert out.returncode == 0, out.stderr
    values = [int(v) for v in out.stdout.split()]
    assert values[: len(CASES)] == [ref.layer_key(s, layer) for s, layer in CASES]
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


# ---- superpose's per-thread work, run on the host ------------------------------------------------
_SUPERPOSE_HOST = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "superpose_impl.cuh"
using namespace supsup_cuda;
template <typename T, int V>
void run(sup::Shape s, const float* w32, const int32_t* bank, const float* alpha, float* result) {
  std::vector<T> w(s.n * s.k + 16), out(s.n * s.k + 16);
  T* wp = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(w.data()) + 15) / 16 * 16);
  T* op = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(out.data()) + 15) / 16 * 16);
  for (int64_t i = 0; i < s.n * s.k; ++i) wp[i] = detail::from_float<T>(w32[i]);
  std::vector<float> ws(static_cast<size_t>(s.chunks) * s.groups * V * 32 + 4);
  float* wsp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ws.data()) + 15) / 16 * 16);
  for (int c = 0; c < s.chunks; ++c)  // every block of every chunk, then the last one's sum
    for (int64_t g = 0; g < s.groups; ++g) sup::chunk_thread<T, V>(wp, bank, wsp, op, s, g, c, alpha + sup::chunk_begin(s, c));
  if (s.chunks > 1)
    for (int64_t g = 0; g < s.groups; ++g) sup::finish_thread<T, V>(wp, wsp, op, s, g);
  for (int64_t i = 0; i < s.n * s.k; ++i) result[i] = detail::to_float(op[i]);
}
int main(int argc, char** argv) {
  const int64_t n = atoll(argv[1]), k = atoll(argv[2]), t = atoll(argv[3]);
  const int chunks = atoi(argv[4]), vec = atoi(argv[5]), half = atoi(argv[6]);
  const int64_t wpr = (k + 31) / 32, slab = n * wpr;
  std::vector<float> w(n * k), alpha(t + 1), out(n * k);
  std::vector<int32_t> bank(t * slab + 4);
  int32_t* bp = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(bank.data()) + 15) / 16 * 16);
  FILE* f = fopen(argv[7], "rb");
  if (fread(w.data(), 4, n * k, f) != size_t(n * k) || fread(bp, 4, t * slab, f) != size_t(t * slab) ||
      fread(alpha.data(), 4, t, f) != size_t(t)) return 2;
  fclose(f);
  sup::Shape s{n, k, wpr, slab, (slab + vec - 1) / vec, t, chunks, k % 8 == 0};
  if (vec == 4) { if (half) run<__half, 4>(s, w.data(), bp, alpha.data(), out.data()); else run<float, 4>(s, w.data(), bp, alpha.data(), out.data()); }
  else { if (half) run<__half, 1>(s, w.data(), bp, alpha.data(), out.data()); else run<float, 1>(s, w.data(), bp, alpha.data(), out.data()); }
  f = fopen(argv[8], "wb");
  fwrite(out.data(), 4, n * k, f);
  fclose(f);
  return 0;
}
"""

# (n, k, T, chunks, words per thread): one chunk and several, a slab of 4k words and not, K%8 and not
SUPERPOSE_CASES = [(7, 33, 5, 1, 1), (40, 300, 300, 3, 4), (16, 64, 1200, 4, 4), (3, 70, 17, 2, 1), (8, 256, 9, 1, 4)]


@pytest.fixture(scope="module")
def superpose_host(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("sup")
    src = d / "superpose_host.cu"
    src.write_text(_SUPERPOSE_HOST)
    exe = d / "superpose_host"
    built = _run([NVCC, "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(src), "-o", str(exe)])
    assert built.returncode == 0, built.stderr[-3000:]
    return exe


@needs_nvcc
@pytest.mark.parametrize("n,k,t,chunks,vec", SUPERPOSE_CASES)
@pytest.mark.parametrize("alphas", ["equal", "mixed"])
@pytest.mark.parametrize("half", [0, 1])
def test_superpose_per_thread_work_matches_reference(superpose_host, tmp_path, n, k, t, chunks, vec, alphas, half):
    """The CUDA superpose's per-thread functions (carry-save counters, chunk partials, the last
    chunk's ordered sum, the vector epilogue), run on the host for every thread and chunk."""
    g = torch.Generator().manual_seed(n * k + t)
    w = torch.randn(n, k, generator=g)
    if half:
        w = w.half().float()
    bank = ref.pack_masks(torch.rand(t, n, k, generator=g) < 0.5)
    alpha = torch.full((t,), 1.0 / t) if alphas == "equal" else torch.rand(t, generator=g)
    alpha[1::3] = 0.0  # skipped tasks
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(w.numpy().tobytes() + bank.numpy().tobytes() + alpha.numpy().tobytes())
    proc = _run([str(superpose_host), str(n), str(k), str(t), str(chunks), str(vec), str(half), str(inp), str(outp)])
    assert proc.returncode == 0, proc.stderr
    got = torch.frombuffer(bytearray(outp.read_bytes()), dtype=torch.float32).reshape(n, k)
    want = ref.superpose(w.double(), bank, alpha.double()).float()
    if half:
        want = want.half().float()
    tol = dict(rtol=2e-3, atol=2e-3) if half else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


# ---- mask_dots' per-thread work, run on the host -------------------------------------------------
_MASK_DOTS_HOST = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "mask_dots_impl.cuh"
using namespace supsup_cuda;
using namespace supsup_cuda::dots;
template <bool V4>
void run(int64_t r, int64_t n, int64_t k, int64_t t, int64_t chunk, const float* v, const int32_t* bank, float* out) {
  const int64_t wpr = (k + 31) / 32, slab = n * wpr, steps = (slab + kStepWords - 1) / kStepWords;
  static float tab[kGroups][kTabStride];
  for (int64_t row = 0; row < r; ++row)
    for (int64_t t0 = 0; t0 < t; t0 += chunk) {
      const int64_t t1 = t0 + chunk < t ? t0 + chunk : t;
      for (int64_t step = 0; step < steps; ++step) {  // every thread's table entries, then every lane pair
        const int64_t word0 = step * kStepWords;
        for (int tid = 0; tid < kDotThreads; ++tid) build_entries<float>(v + row * n * k, k, wpr, slab, word0, tid, tab);
        for (int64_t task = t0; task < t1; ++task) {
          float s[2];
          for (int half = 0; half < 2; ++half) {
            uint32_t bits[kLaneWords];
            load_lane<V4>(bank, slab, task, t1, word0 + kLaneWords * half, bits);
            s[half] = lane_sum(tab, bits, half);
          }
          out[row * t + task] += s[0] + s[1];
        }
      }
    }
}
int main(int argc, char** argv) {
  const int64_t r = atoll(argv[1]), n = atoll(argv[2]), k = atoll(argv[3]), t = atoll(argv[4]), chunk = atoll(argv[5]);
  const int v4 = atoi(argv[6]);
  const int64_t slab = n * ((k + 31) / 32);
  std::vector<float> v(r * n * k), out(r * t, 0.f);
  std::vector<int32_t> bank(t * slab + 4);
  int32_t* bp = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(bank.data()) + 15) / 16 * 16);
  FILE* f = fopen(argv[7], "rb");
  if (fread(v.data(), 4, r * n * k, f) != size_t(r * n * k) || fread(bp, 4, t * slab, f) != size_t(t * slab)) return 2;
  fclose(f);
  if (v4) run<true>(r, n, k, t, chunk, v.data(), bp, out.data()); else run<false>(r, n, k, t, chunk, v.data(), bp, out.data());
  f = fopen(argv[8], "wb");
  fwrite(out.data(), 4, r * t, f);
  fclose(f);
  return 0;
}
"""

# (R, n, k, T, tasks per chunk, 16-byte loads): slabs of 4k words and not, a partial last step
MASK_DOTS_CASES = [(1, 7, 33, 3, 3, 0), (2, 40, 300, 5, 5, 1), (1, 16, 64, 300, 150, 1), (3, 9, 100, 17, 9, 0)]


@pytest.fixture(scope="module")
def mask_dots_host(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("dots")
    src = d / "mask_dots_host.cu"
    src.write_text(_MASK_DOTS_HOST)
    exe = d / "mask_dots_host"
    built = _run([NVCC, "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(src), "-o", str(exe)])
    assert built.returncode == 0, built.stderr[-3000:]
    return exe


@needs_nvcc
@pytest.mark.parametrize("r,n,k,t,chunk,v4", MASK_DOTS_CASES)
def test_mask_dots_per_thread_work_matches_reference(mask_dots_host, tmp_path, r, n, k, t, chunk, v4):
    """The CUDA mask_dots' tables, lane loads (16-byte and guarded) and lookups, on the host."""
    g = torch.Generator().manual_seed(r * n * k + t)
    v = torch.randn(r, n, k, generator=g)
    bank = ref.pack_masks(torch.rand(t, n, k, generator=g) < 0.5)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(v.numpy().tobytes() + bank.numpy().tobytes())
    proc = _run([str(mask_dots_host), str(r), str(n), str(k), str(t), str(chunk), str(v4), str(inp), str(outp)])
    assert proc.returncode == 0, proc.stderr
    got = torch.frombuffer(bytearray(outp.read_bytes()), dtype=torch.float32).reshape(r, t)
    want = ref.mask_dots(v.double(), bank).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (n * k) ** 0.5)
