"""The seed formats: version 1 unchanged, version 2's spec, C++ and CUDA-header implementations agree.

* version 1 through ``seed_format`` is bit-identical to ``reference.signed_constant`` (which every
  existing bank and checkpoint was written with) and to the compiled fill, and stays the default;
* version 2: the PyTorch spec equals an independent plain-Python transcription of the docstring's
  formulas, the compiled sign words and fill (every dtype, odd shapes, conv shapes, seeds outside
  32 bits), and the torch-free header compiled by nvcc for host code;
* version 2's bits look random where it matters to a base network (balance, rows and layers
  independent).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from supsup_fast import SupsupError, base_weights, reference, seed_format
from supsup_fast._native import _C, EXT_LOADED
from supsup_fast.format import words_per_row

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SEEDS = [(0, 0), (1, 2), (2**40 + 5, 3), (-7, 2**31 - 1), (2**32 - 1, -1)]
NK = [(1, 1), (3, 31), (5, 32), (7, 33), (37, 100), (2, 129), (11, 784)]

U32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# The docstring's formulas in plain Python integers: an independent transcription
# --------------------------------------------------------------------------------------
def _h(x: int) -> int:
    x &= U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & U32
    x ^= x >> 16
    return x


def _v2_word(seed: int, layer: int, n: int, j: int) -> int:
    key = _h((layer & U32) ^ _h(seed & U32))
    kr, kc = _h(key ^ 0x243F6A88), _h(key ^ 0x85A308D3)
    return _h(_h(kr ^ n) ^ _h(kc ^ j))


def _v1_sign(seed: int, layer: int, idx: int) -> bool:
    key = _h((layer & U32) ^ _h(seed & U32))
    return bool(_h((idx & U32) ^ key) & 1)


def _u32(t: torch.Tensor) -> list[list[int]]:
    return (t.to(torch.int64) & U32).tolist()


@pytest.mark.parametrize("seed,layer", SEEDS)
def test_v2_spec_matches_its_formulas(seed, layer):
    n, k = 6, 100
    words = seed_format.v2_sign_words(seed, layer, n, k)
    assert words.dtype == torch.int32 and words.shape == (n, words_per_row(k))
    assert _u32(words) == [[_v2_word(seed, layer, r, j) for j in range(words_per_row(k))] for r in range(n)]
    signs = seed_format.signs(seed, layer, (n, k), version=2)
    want = [[bool(_v2_word(seed, layer, r, c // 32) >> (c % 32) & 1) for c in range(k)] for r in range(n)]
    assert signs.tolist() == want


@pytest.mark.parametrize("seed,layer", SEEDS)
def test_v1_spec_is_the_reference_hash(seed, layer):
    shape = (4, 3, 5)
    assert seed_format.layer_key(seed, layer) == reference.layer_key(seed, layer)
    signs = seed_format.signs(seed, layer, shape, version=1)
    assert signs.reshape(-1).tolist() == [_v1_sign(seed, layer, i) for i in range(60)]
    assert torch.equal(signs.reshape(-1), reference.signed_constant_signs(seed, layer, 60))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(30, 784), (7, 3, 5, 5), (1, 1), (5, 33)])
@pytest.mark.parametrize("seed,layer", SEEDS[2:])
def test_v1_is_unchanged_and_v2_the_default(dtype, shape, seed, layer):
    want = reference.signed_constant(seed, layer, shape, gain=1.3, dtype=dtype, format_version=1)
    assert torch.equal(seed_format.signed_constant(seed, layer, shape, gain=1.3, dtype=dtype, version=1), want)
    v2 = seed_format.signed_constant(seed, layer, shape, gain=1.3, dtype=dtype, version=2)
    assert torch.equal(seed_format.signed_constant(seed, layer, shape, gain=1.3, dtype=dtype), v2)
    # the functions that name a base take seeds in [0, 2**32): the hash reads those 32 bits
    seed, layer = seed % 2**32, layer % 2**32
    assert torch.equal(base_weights.signed_constant(seed, layer, shape, 1.3, dtype, format_version=1), want)
    assert torch.equal(base_weights.signed_constant(seed, layer, shape, 1.3, dtype), v2)
    assert (seed_format.DEFAULT_SEED_FORMAT, seed_format.UNRECORDED_SEED_FORMAT) == (2, 1)


def test_versions_differ_and_bad_versions_are_refused():
    v1 = seed_format.signs(3, 4, (64, 64), version=1)
    v2 = seed_format.signs(3, 4, (64, 64), version=2)
    assert 0.4 < (v1 == v2).float().mean().item() < 0.6
    for bad in (0, 3, "2", 2.0, True, None):
        with pytest.raises(ValueError, match="seed format version must be one of"):
            seed_format.check_version(bad)
        with pytest.raises(SupsupError, match="seed format version"):
            base_weights.signed_constant(1, 2, (3, 4), format_version=bad)


# --------------------------------------------------------------------------------------
# Compiled implementations
# --------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("seed,layer", SEEDS)
def test_compiled_sign_words_match_the_spec(version, seed, layer):
    for n, k in NK:
        want = seed_format.sign_words(seed, layer, n, k, version)
        got = _C.seed_sign_words(n, k, seed, layer, version)
        assert torch.equal(got, want), (n, k)
    assert _C.seed_sign_words(0, 5, 1, 2, version).shape == (0, 1)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (37, 100), (5, 3, 3, 3), (16, 4, 5, 1), (300, 784)])
@pytest.mark.parametrize("seed,layer", SEEDS[1:4])
def test_compiled_v2_fill_matches_the_spec(dtype, shape, seed, layer):
    want = seed_format.signed_constant(seed, layer, shape, gain=0.7, dtype=dtype, version=2)
    got = base_weights.signed_constant(seed % 2**32, layer % 2**32, shape, 0.7, dtype, format_version=2)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)
    c = torch.tensor(0.7 / math.sqrt(math.prod(shape[1:])), dtype=torch.float32).to(dtype)
    assert torch.equal(got.abs(), c.expand(shape))


@needs_ext
def test_compiled_ops_refuse_bad_input():
    with pytest.raises(RuntimeError, match="format_version must be 1 or 2"):
        _C.seed_sign_words(3, 4, 1, 2, 3)
    with pytest.raises(RuntimeError, match="n and k must be >= 0"):
        _C.seed_sign_words(-1, 4, 1, 2, 2)
    out = torch.empty(4, 5)
    with pytest.raises(RuntimeError, match="format_version must be 1 or 2"):
        torch.ops.supsup_fast_C.seeded_fill_(out, 1, 2, 0.5, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.supsup_fast_C.seeded_fill_(torch.empty(5, 4).t(), 1, 2, 0.5, 2)


_HOST_PROGRAM = r"""
#include <cstdio>
#include "seed_format.h"
int main() {
  const long long cases[][2] = {%s};
  for (const auto& c : cases) {
    const supsup_seed::V2Keys keys = supsup_seed::v2_keys(c[0], c[1]);
    for (unsigned n = 0; n < 3; ++n)
      for (unsigned j = 0; j < 4; ++j) std::printf("%%u\n", supsup_seed::v2_sign_word(keys, n, j));
    unsigned v1 = 0;
    const unsigned key = supsup_seed::layer_key(c[0], c[1]);
    for (unsigned i = 0; i < 32; ++i) v1 |= unsigned(supsup_seed::v1_sign(i, key)) << i;
    std::printf("%%u\n", v1);
  }
  return 0;
}
"""


def test_cuda_header_matches_the_spec(tmp_path):
    """csrc/seed_format.h is what CUDA kernels include: compile it with nvcc (host code) and compare."""
    import shutil

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "seed_check.cu"
    src.write_text(_HOST_PROGRAM % ", ".join(f"{{{s}LL, {lay}LL}}" for s, lay in SEEDS))
    exe = tmp_path / "seed_check"
    built = subprocess.run([nvcc, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    values = [int(v) for v in out.stdout.split()]
    want = []
    for s, lay in SEEDS:
        want += [_v2_word(s, lay, n, j) for n in range(3) for j in range(4)]
        want.append(sum(int(_v1_sign(s, lay, i)) << i for i in range(32)))
    assert values == want


# --------------------------------------------------------------------------------------
# Version 2 looks random where a base network needs it to
# --------------------------------------------------------------------------------------
def test_v2_bits_are_balanced_and_independent():
    n, k = 512, 4096
    s = seed_format.signs(12345, 7, (n, k), version=2).float()
    sigma = 0.5 / math.sqrt(n * k)
    assert abs(s.mean().item() - 0.5) < 6 * sigma
    # every bit position of the sign word, every row, every column word: balanced
    by_bit = s.reshape(n, k // 32, 32).mean((0, 1))
    assert (by_bit - 0.5).abs().max().item() < 6 * 0.5 / math.sqrt(n * k / 32)
    by_row = s.mean(1)
    assert (by_row - 0.5).abs().max().item() < 6 * 0.5 / math.sqrt(k)
    # neighbouring rows, neighbouring words and another layer agree on about half the signs
    assert abs((s[1:] == s[:-1]).float().mean().item() - 0.5) < 6 * 0.5 / math.sqrt((n - 1) * k)
    words = s.reshape(n, k // 32, 32)
    assert abs((words[:, 1:] == words[:, :-1]).float().mean().item() - 0.5) < 0.01
    other = seed_format.signs(12345, 8, (n, k), version=2).float()
    assert abs((s == other).float().mean().item() - 0.5) < 6 * sigma * 2
    # no two rows share a word (a shifted copy of another row would show up here)
    w = seed_format.v2_sign_words(12345, 7, n, k).to(torch.int64)
    assert torch.unique(w).numel() >= w.numel() - 2


# --------------------------------------------------------------------------------------
# Triton: the same words from supsup_fast.kernels.seed_format (interpreter; sm_90 compile)
# --------------------------------------------------------------------------------------
_TRITON_CHECK = r"""
import torch
from supsup_fast import seed_format as sf
from supsup_fast.kernels import seed_format as ks
for s, l, n, k in [(0, 0, 3, 64), (1, 2, 37, 100), (2**40 + 5, 3, 5, 1), (-7, 2**31 - 1, 11, 784),
                   (2**32 - 1, -1, 2, 33)]:
    assert torch.equal(ks.v2_sign_words(s, l, n, k, "cpu"), sf.v2_sign_words(s, l, n, k)), (s, l, n, k)
print("ok")
"""


def test_triton_sign_words_match_the_spec():
    pytest.importorskip("triton")
    import os
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_triton_sign_words_compile_for_sm90():
    import os

    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("ahead-of-time compilation needs TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from supsup_fast.kernels import seed_format as ks

    src = ASTSource(ks.v2_sign_words_kernel, signature={"out_ptr": "*i32", "N": "i32", "WPR": "i32", "kr": "u32",
                                                        "kc": "u32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    assert kernel.asm.get("cubin") and ".target sm_90" in ptx
    # 32-bit integer arithmetic only: no 64-bit multiplies in the hash
    assert "mul.lo.s32" in ptx or "mul.lo.u32" in ptx
    assert "mul.lo.s64" not in ptx and "mul.wide" not in ptx
