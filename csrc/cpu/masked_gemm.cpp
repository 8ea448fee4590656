// The many-row fp32 masked GEMMs: y = x (W * M)^T + b and dL/dx = dL/dy (W * M), with the mask
// applied while W is packed.
//
// "W * M, then the platform GEMM" writes W * M to memory; the GEMM then reads it back and packs
// it again. Here each thread packs the part of W it multiplies, straight from W and the mask:
// an AVX-512 masked load takes 16 mask bits as its lane mask, so masking costs nothing, and the
// masked weights never leave the core's caches.
//
// Packing: a panel holds 32 outputs side by side for every step of the sum. For y, 16 rows x
// 16 columns of W are loaded (masked) and transposed in registers; for dL/dx the outputs are
// W's columns, so a panel row is a masked copy of part of a W row.
// Microkernel: 8 rows of x (or dL/dy) times one panel into 8 x 2 vector accumulators; each step
// broadcasts one element of each row (read in place: the left operand needs no packing) and
// multiplies two panel vectors.
// Blocking: the sum in blocks of 256 (a panel's block stays in L1), rows in chunks of 128 (they
// stay in L2; W * M is then packed once for all chunks); threads split the outputs or the rows,
// whichever leaves less work on the busiest thread, counting the packing each thread does.
//
// The AVX-512 functions carry a target attribute: the file builds with the extension's AVX2
// baseline, and the kernel runs only where the CPU has AVX-512F.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed masked intrinsics with an "undefined" vector, which its own
// -Wuninitialized then reports after inlining
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu/masked_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/avx512.h"

#define SUPSUP_AVX512_DISPATCH SUPSUP_AVX512_TARGET

namespace supsup {

namespace {

bool avx512_wanted_at_load() {
  const char* e = std::getenv("SUPSUP_FAST_NO_AVX512");
  return e == nullptr || *e == '\0' || std::strcmp(e, "0") == 0;
}

std::atomic<bool> g_avx512_enabled{avx512_wanted_at_load()};

constexpr int64_t kLanes = 16;     // floats per vector
constexpr int64_t kMR = 8;         // rows of x per microkernel call
constexpr int64_t kNR = 32;        // outputs per packed panel (two vectors)
constexpr int64_t kKC = 256;       // K per block
constexpr int64_t kMC = 128;       // rows of x per chunk
constexpr int64_t kPackRows = 16;  // packing one output costs about as much as 16 rows of FMAs

// y [m, outputs] = a [m, depth] B + bias, B = (W * M)^T (the forward: outputs are W's rows) or
// B = W * M (dL/dx: outputs are W's columns).
struct Problem {
  const float* a;
  const float* w;  // W [rows, wk], mask bits [rows, nw]
  const uint32_t* bits;
  const float* bias;  // [outputs] or null
  float* y;
  int64_t m, outputs, depth, wk, nw;
  int64_t panel_rows;  // depth, rounded up to whole 16-row transposes for the forward
  bool transposed;
};

#if SUPSUP_AVX512_DISPATCH

// 64-byte aligned float scratch owned by the calling thread; grows, never shrinks.
struct Scratch {
  std::unique_ptr<float, decltype(&std::free)> data{nullptr, &std::free};
  size_t capacity = 0;
  float* get(size_t floats) {
    if (floats > capacity) {
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      data.reset();
      float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(p != nullptr, "masked_linear: out of memory allocating a ", bytes, "-byte packing buffer");
      data.reset(p);
      capacity = bytes / sizeof(float);
    }
    return data.get();
  }
};

// Forward: outputs [n0, n0 + cols) (cols <= 32) of W * M, transposed into dst [panel_rows][width],
// width = 16 or 32; zeros past k and past the last output.
SUPSUP_AVX512_FN void pack_rows_transposed(const Problem& p, int64_t n0, int64_t cols, int64_t width, float* dst) {
  const int64_t steps = p.panel_rows / kLanes;
  const __mmask16 tail = p.wk % kLanes ? static_cast<__mmask16>((1u << (p.wk % kLanes)) - 1) : __mmask16(0xFFFF);
  for (int64_t s = 0; s < steps; ++s) {
    const __mmask16 in_k = s + 1 == steps ? tail : __mmask16(0xFFFF);
    for (int64_t h = 0; h < width / kLanes; ++h) {
      __m512 r[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t col = h * kLanes + i;
        if (col >= cols) {
          r[i] = _mm512_setzero_ps();
          continue;
        }
        const uint32_t* row_bits = p.bits + (n0 + col) * p.nw;
        const __mmask16 m = in_k & static_cast<__mmask16>(row_bits[s >> 1] >> ((s & 1) * 16));
        r[i] = _mm512_maskz_loadu_ps(m, p.w + (n0 + col) * p.wk + s * kLanes);
      }
      transpose16(r);
      for (int64_t c = 0; c < kLanes; ++c) _mm512_store_ps(dst + (s * kLanes + c) * width + h * kLanes, r[c]);
    }
  }
}

// dL/dx: columns [c0, c0 + cols) of W * M (c0 a multiple of 16), row by row into
// dst [panel_rows][width]; zeros past the last column.
SUPSUP_AVX512_FN void pack_columns(const Problem& p, int64_t c0, int64_t cols, int64_t width, float* dst) {
  for (int64_t h = 0; h < width / kLanes; ++h) {
    const int64_t left = cols - h * kLanes;
    const __mmask16 in_cols = left >= kLanes ? __mmask16(0xFFFF)
                              : left <= 0    ? __mmask16(0)
                                             : static_cast<__mmask16>((1u << left) - 1);
    const int64_t s = c0 / kLanes + h;  // the 16-column step of W's rows
    for (int64_t d = 0; d < p.depth; ++d) {
      const uint32_t* row_bits = p.bits + d * p.nw;
      const __mmask16 m = in_cols & static_cast<__mmask16>(row_bits[s >> 1] >> ((s & 1) * 16));
      _mm512_store_ps(dst + d * width + h * kLanes, _mm512_maskz_loadu_ps(m, p.w + d * p.wk + s * kLanes));
    }
  }
}

SUPSUP_AVX512_FN void pack_panel(const Problem& p, int64_t c0, int64_t cols, int64_t width, float* dst) {
  if (p.transposed)
    pack_rows_transposed(p, c0, cols, width, dst);
  else
    pack_columns(p, c0, cols, width, dst);
}

// y[r0 + i, n0 + j] (+)= sum over k in [k0, k1) of a[r0 + i, k] panel[k, j], for i < MR and
// j < cols (<= 16 NV). The first K block starts from the bias, later ones add to y.
template <int NV, int MR>
SUPSUP_AVX512_FN void microkernel(const Problem& p, const float* panel, int64_t r0, int64_t n0, int64_t cols,
                                  int64_t k0, int64_t k1) {
  constexpr int64_t width = NV * kLanes;
  __m512 acc[MR][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const float* ar[MR];  // the rows of a, read in place
  for (int64_t i = 0; i < MR; ++i) ar[i] = p.a + (r0 + i) * p.depth;
  const float* b = panel + k0 * width;
  for (int64_t kk = k0; kk < k1; ++kk, b += width) {
    __m512 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + v * kLanes);
    for (int64_t i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(ar[i][kk]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, bv[v], acc[i][v]);
    }
  }
  __mmask16 in_n[NV];
  __m512 base[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t c = cols - v * kLanes;
    in_n[v] = c >= kLanes ? __mmask16(0xFFFF) : c <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << c) - 1);
    base[v] = (k0 == 0 && p.bias) ? _mm512_maskz_loadu_ps(in_n[v], p.bias + n0 + v * kLanes) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < MR; ++i) {
    float* yr = p.y + (r0 + i) * p.outputs + n0;
    for (int v = 0; v < NV; ++v) {
      const __m512 prev = k0 == 0 ? base[v] : _mm512_maskz_loadu_ps(in_n[v], yr + v * kLanes);
      _mm512_mask_storeu_ps(yr + v * kLanes, in_n[v], _mm512_add_ps(acc[i][v], prev));
    }
  }
}

// The microkernel for `rows` (<= 8) rows of x and a panel `cols` wide.
template <int NV>
SUPSUP_AVX512_FN void microkernel_rows(const Problem& p, const float* panel, int64_t r0, int64_t rows, int64_t n0,
                                       int64_t cols, int64_t k0, int64_t k1) {
  switch (rows) {
    case 8:
      return microkernel<NV, 8>(p, panel, r0, n0, cols, k0, k1);
    case 7:
      return microkernel<NV, 7>(p, panel, r0, n0, cols, k0, k1);
    case 6:
      return microkernel<NV, 6>(p, panel, r0, n0, cols, k0, k1);
    case 5:
      return microkernel<NV, 5>(p, panel, r0, n0, cols, k0, k1);
    case 4:
      return microkernel<NV, 4>(p, panel, r0, n0, cols, k0, k1);
    case 3:
      return microkernel<NV, 3>(p, panel, r0, n0, cols, k0, k1);
    case 2:
      return microkernel<NV, 2>(p, panel, r0, n0, cols, k0, k1);
    default:
      return microkernel<NV, 1>(p, panel, r0, n0, cols, k0, k1);
  }
}

// Rows [r0, r1) x outputs [c0, c1) of y (c0 a multiple of 32).
SUPSUP_AVX512_FN void gemm_block(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (r0 >= r1 || c0 >= c1) return;
  thread_local Scratch buffer;
  const int64_t panels = (c1 - c0 + kNR - 1) / kNR;
  // with more than one chunk of rows, W * M of these outputs is packed once for all chunks;
  // with one, each panel is packed just before its use, while it is still in L1/L2
  const bool pack_all = r1 - r0 > kMC;
  float* packed = buffer.get(static_cast<size_t>((pack_all ? panels : 1) * p.panel_rows * kNR));
  const auto panel_at = [&](int64_t q) { return packed + (pack_all ? q : 0) * p.panel_rows * kNR; };
  const auto pack = [&](int64_t q) {
    const int64_t n0 = c0 + q * kNR, cols = std::min(kNR, c1 - n0);
    pack_panel(p, n0, cols, cols > kLanes ? kNR : kLanes, panel_at(q));
  };
  if (pack_all)
    for (int64_t q = 0; q < panels; ++q) pack(q);
  for (int64_t m0 = r0; m0 < r1; m0 += kMC) {
    const int64_t m1 = std::min(r1, m0 + kMC);
    for (int64_t q = 0; q < panels; ++q) {
      if (!pack_all) pack(q);
      const int64_t n0 = c0 + q * kNR, cols = std::min(kNR, c1 - n0);
      const float* panel = panel_at(q);
      for (int64_t k0 = 0; k0 < p.depth; k0 += kKC) {
        const int64_t k1 = std::min(p.depth, k0 + kKC);
        for (int64_t i = m0; i < m1; i += kMR) {
          const int64_t rows = std::min(kMR, m1 - i);
          if (cols > kLanes)
            microkernel_rows<2>(p, panel, i, rows, n0, cols, k0, k1);
          else
            microkernel_rows<1>(p, panel, i, rows, n0, cols, k0, k1);
        }
      }
    }
  }
}

// Splits rows into `tm` and outputs (in 32-wide panels) into `tn` parts; part `t` of tn * tm.
SUPSUP_AVX512_FN void gemm_part(const Problem& p, int64_t tn, int64_t tm, int64_t t) {
  const int64_t row_blocks = (p.m + kMR - 1) / kMR, panels = (p.outputs + kNR - 1) / kNR;
  const int64_t i = t / tn, j = t % tn;
  const int64_t r0 = std::min(p.m, row_blocks * i / tm * kMR), r1 = std::min(p.m, row_blocks * (i + 1) / tm * kMR);
  const int64_t c0 = std::min(p.outputs, panels * j / tn * kNR);
  const int64_t c1 = std::min(p.outputs, panels * (j + 1) / tn * kNR);
  gemm_block(p, r0, r1, c0, c1);
}
#endif

}  // namespace

bool cpu_has_avx512() {
#if SUPSUP_AVX512_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;  // libgcc also checks that the OS saves zmm state
  }();
  return has;
#else
  return false;
#endif
}

bool masked_gemm_available() {
  return cpu_has_avx512() && g_avx512_enabled.load(std::memory_order_relaxed);
}

void set_avx512_enabled(bool enabled) {
  g_avx512_enabled.store(enabled, std::memory_order_relaxed);
}

namespace {

// y = a B (+ bias) over all threads: the split of outputs and rows with the least work on the
// busiest thread, counting its outputs x (its rows + the packing, in rows' worth); only as
// many threads as get >= ~0.25 MFLOP each.
void run_problem(const Problem& p) {
#if SUPSUP_AVX512_DISPATCH
  TORCH_CHECK(masked_gemm_available(), "masked GEMM: AVX-512F is not available or is switched off");
  if (p.m <= 0 || p.outputs <= 0) return;
  if (p.depth == 0) {  // no products: y is the bias
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.outputs; ++j) p.y[i * p.outputs + j] = p.bias ? p.bias[j] : 0.f;
    return;
  }
  const int64_t flops = 2 * p.m * p.outputs * p.depth;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), flops >> 18));
  const int64_t row_blocks = (p.m + kMR - 1) / kMR, panels = (p.outputs + kNR - 1) / kNR;
  int64_t tn = 1, tm = 1, best = -1;
  for (int64_t a = 1; a <= threads; ++a) {
    const int64_t b = threads / a;  // a parts of the outputs, b of the rows
    if (threads % a || a > panels || b > row_blocks) continue;
    int64_t widest = 0;  // in 16-output strips, as the microkernel computes them
    for (int64_t j = 0; j < a; ++j) {
      const int64_t c0 = std::min(p.outputs, panels * j / a * kNR);
      const int64_t c1 = std::min(p.outputs, panels * (j + 1) / a * kNR);
      widest = std::max(widest, (c1 - c0 + kLanes - 1) / kLanes);
    }
    const int64_t cost = widest * ((row_blocks + b - 1) / b * kMR + kPackRows);
    if (best < 0 || cost < best) best = cost, tn = a, tm = b;
  }
  at::parallel_for(0, tn * tm, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemm_part(p, tn, tm, t);
  });
#else
  (void)p;
  TORCH_CHECK(false, "masked GEMM: this build has no AVX-512 kernels");
#endif
}

}  // namespace

void masked_gemm_f32(const float* x, int64_t m, int64_t k, const float* w, const uint32_t* bits, int64_t n,
                     const float* bias, float* y) {
  const int64_t nw = (k + 31) / 32, panel_rows = (k + kLanes - 1) / kLanes * kLanes;
  run_problem(Problem{x, w, bits, bias, y, m, n, k, k, nw, panel_rows, true});
}

void masked_gemm_grad_input_f32(const float* grad_out, int64_t m, int64_t n, const float* w, const uint32_t* bits,
                                int64_t k, float* grad_x) {
  run_problem(Problem{grad_out, w, bits, nullptr, grad_x, m, k, n, k, (k + 31) / 32, n, false});
}

}  // namespace supsup
