// Masked linear layers: forward, the two backward products, per-row task groups, and the
// variant whose signed-constant weight is regenerated from the hash instead of read.
//
// Few rows (a GEMV-like shape) are memory-bound: a fused kernel reads each weight and its mask
// bit once and never writes W*M. Many rows are compute-bound: on AVX-512 CPUs the masked GEMM
// (masked_gemm.cpp) applies the mask while it packs W; elsewhere, and for large problems where
// the platform GEMM's peak wins, one W*M pass into a reused buffer feeds the platform GEMM, in
// fixed tiles so that the result does not depend on the thread count (deterministic_mm).
#include "cpu/bits.h"
#include "cpu/masked_gemm.h"
#include "cpu/ops.h"

#include <c10/core/GradMode.h>

#include <vector>

namespace supsup {

namespace {

// Up to this many rows the fused fp32 kernels beat "W*M, then GEMM" (measured on AVX2 cores):
// the forward reuses each masked weight vector across 4 rows in registers, dX only across 2.
constexpr int64_t kFusedMaxRows = 16;
constexpr int64_t kFusedGradMaxRows = 8;

// The forward's kernel for fp32 x with m rows: the fused kernel up to 8 rows where the AVX-512
// masked GEMM runs (it wins from 9 rows on), and the masked GEMM until the problem is large
// enough that the platform GEMM's higher peak outweighs its extra W*M pass (measured on a
// 2-core AVX-512 Xeon: from ~1024 rows of a 1024 x 1024 layer on; LeNet-sized layers never).
// dL/dx (a sum over the N outputs) takes the masked GEMM past its fused kernel's 8 rows when
// N >= 32 and up to 256 rows of a large layer (measured the same way).
enum class Forward { kFused, kMaskedGemm, kPlatformGemm };
bool masked_gemm_wins(int64_t m, int64_t n, int64_t k, int64_t large_layer_max_rows) {
  return masked_gemm_available() && (m <= large_layer_max_rows || n * k < (1 << 18));
}
Forward forward_kernel(int64_t m, int64_t n, int64_t k) {
  if (SUPSUP_AVX2 && m <= (masked_gemm_available() ? 8 : kFusedMaxRows)) return Forward::kFused;
  return masked_gemm_wins(m, n, k, 512) ? Forward::kMaskedGemm : Forward::kPlatformGemm;
}

at::Tensor flat_rows(const at::Tensor& t) {
  const int64_t last = t.dim() ? t.size(-1) : 1;
  return t.reshape({-1, last}).contiguous();
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

#if SUPSUP_AVX2
// y[m * ldo + jj] = <x_m, w_jj * bits_jj> + b_jj for MB rows of x ([MB, k], row stride k) and NB
// outputs (rows of w from `w`, stride k; their words from `words`, stride nw). Each (row, output)
// pair is one accumulator chain in the same order whatever MB and NB, so a result does not depend
// on the rows or outputs it is computed with; the MB x NB chains are independent, so the FMAs of
// one row and output (a GEMV's) do not wait on each other.
template <int MB, int NB>
inline void fused_dot(const float* x, int64_t k, const float* w, const uint32_t* words, int64_t nw, float* y,
                      int64_t ldo, const float* bias) {
  const BitLanes L;
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int jj = 0; jj < NB; ++jj) acc[m][jj] = _mm256_setzero_ps();
  const int64_t full = k / kWordBits;
  for (int64_t wi = 0; wi < full; ++wi) {
    __m256i wv[NB];
    for (int jj = 0; jj < NB; ++jj) wv[jj] = _mm256_set1_epi32(static_cast<int>(words[jj * nw + wi]));
    const int64_t o = wi * kWordBits;
    for (int q = 0; q < 4; ++q) {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * k + o + 8 * q);
      for (int jj = 0; jj < NB; ++jj) {
        const __m256 mw = masked8(_mm256_loadu_ps(w + jj * k + o + 8 * q), L.sel(wv[jj], q));
        for (int m = 0; m < MB; ++m) acc[m][jj] = _mm256_fmadd_ps(xv[m], mw, acc[m][jj]);
      }
    }
  }
  for (int jj = 0; jj < NB; ++jj) {
    float tail[MB] = {};
    if (full * kWordBits < k) {
      const uint32_t word = words[jj * nw + full];
      for (int64_t i = full * kWordBits; i < k; ++i) {
        // the masked weight is an exact zero, still multiplied: a NaN or Inf in x reaches the output
        const float wi = ((word >> (i - full * kWordBits)) & 1u) ? w[jj * k + i] : 0.f;
        for (int m = 0; m < MB; ++m) tail[m] += x[m * k + i] * wi;
      }
    }
    const float b = bias ? bias[jj] : 0.f;
    for (int m = 0; m < MB; ++m) y[m * ldo + jj] = hsum(acc[m][jj]) + tail[m] + b;
  }
}

// Every row of x against NB outputs starting at output j: rows in fours for one output, in pairs for two.
template <int NB>
inline void fused_outputs(const float* x, int64_t m_rows, int64_t k, const float* w, const uint32_t* bits, int64_t nw,
                          int64_t n, const float* bias, float* y, int64_t j) {
  const float* wj = w + j * k;
  const uint32_t* bj = bits + j * nw;
  const float* b = bias ? bias + j : nullptr;
  int64_t m = 0;
  if constexpr (NB == 1)
    for (; m + 4 <= m_rows; m += 4) fused_dot<4, 1>(x + m * k, k, wj, bj, nw, y + m * n + j, n, b);
  if constexpr (NB <= 2)
    for (; m + 2 <= m_rows; m += 2) fused_dot<2, NB>(x + m * k, k, wj, bj, nw, y + m * n + j, n, b);
  for (; m < m_rows; ++m) fused_dot<1, NB>(x + m * k, k, wj, bj, nw, y + m * n + j, n, b);
}

// y [M, N] = x [M, k] (W*M)^T + b for small M, parallel over outputs, 4 independent chains at a time:
// 4 outputs x 1 row (a GEMV), 2 outputs x 2 rows (2-3 rows), 1 output x 4 rows (4 or more rows, where
// x's rows share each load of W). Measured (one thread, 1024x1024 / 300x784): M = 1 1.5-2x the one
// chain per output it replaces, M = 4 and 8 as before.
void fused_forward(const float* x, int64_t m_rows, int64_t k, const float* w, const uint32_t* bits, int64_t n,
                   const float* bias, float* y) {
  const int64_t nw = words_per_row(k);
  const int64_t grain = std::max<int64_t>(4, 32768 / std::max<int64_t>(k * m_rows, 1));
  const int64_t block = m_rows == 1 ? 4 : m_rows < 4 ? 2 : 1;
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    int64_t j = n0;
    if (block > 1)
      for (; j + block <= n1; j += block) {
        if (block == 4)
          fused_outputs<4>(x, m_rows, k, w, bits, nw, n, bias, y, j);
        else
          fused_outputs<2>(x, m_rows, k, w, bits, nw, n, bias, y, j);
      }
    for (; j < n1; ++j) fused_outputs<1>(x, m_rows, k, w, bits, nw, n, bias, y, j);
  });
}

// dx [M, k] = dy [M, n] (W*M) for small M, parallel over 32-column word strips.
template <int MB>
inline void fused_strip(const float* dy, int64_t n, const float* w, const uint32_t* bits, int64_t k, int64_t wi,
                        float* dx) {
  const BitLanes L;
  const int64_t nw = words_per_row(k), o = wi * kWordBits;
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(bits[j * nw + wi]));
    const float* wr = w + j * k + o;
    __m256 g[MB];
    for (int m = 0; m < MB; ++m) g[m] = _mm256_set1_ps(dy[m * n + j]);
    for (int q = 0; q < 4; ++q) {
      const __m256 mw = masked8(_mm256_loadu_ps(wr + 8 * q), L.sel(wv, q));
      for (int m = 0; m < MB; ++m) acc[m][q] = _mm256_fmadd_ps(g[m], mw, acc[m][q]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dx + m * k + o + 8 * q, acc[m][q]);
}

void fused_grad_input(const float* dy, int64_t m_rows, int64_t n, const float* w, const uint32_t* bits, int64_t k,
                      float* dx) {
  const int64_t nw = words_per_row(k), full = k / kWordBits;
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t wi = w0; wi < w1; ++wi) {
      if (wi < full) {
        int64_t m = 0;
        for (; m + 2 <= m_rows; m += 2) fused_strip<2>(dy + m * n, n, w, bits, k, wi, dx + m * k);
        if (m < m_rows) fused_strip<1>(dy + m * n, n, w, bits, k, wi, dx + m * k);
        continue;
      }
      // the partial last strip: scalar, never reading past column k
      const int64_t o = wi * kWordBits;
      for (int64_t m = 0; m < m_rows; ++m) {
        float acc[kWordBits] = {};
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t word = bits[j * nw + wi];
          const float g = dy[m * n + j];
          for (int64_t i = o; i < k; ++i) acc[i - o] += g * (((word >> (i - o)) & 1u) ? w[j * k + i] : 0.f);
        }
        for (int64_t i = o; i < k; ++i) dx[m * k + i] = acc[i - o];
      }
    }
  });
}
#endif

void check_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_words,
                  const std::optional<at::Tensor>& bias, const char* op) {
  check_float(x, op, "x");
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x dtype ", x.scalar_type(), " != weight dtype ",
              weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x has shape ", x.sizes(),
              "; its last dim must be K=", weight.size(1));
  check_words(mask_words, weight.size(0), weight.size(1), 0, op, "mask_words");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias shape ", bias->sizes(), " != (",
                weight.size(0), ",)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
  }
}

// Signs of one row of the signed constant (+c / -c), unmasked.
template <typename T>
void seeded_row(int64_t row, int64_t k, uint32_t key, T pos, T neg, T* out) {
  const int64_t base = row * k;
  for (int64_t i = 0; i < k; ++i) out[i] = hash_sign(base + i, key) ? pos : neg;
}

// W * M in a per-thread scratch buffer. The many-row paths only feed W * M to the GEMM, so one
// reused buffer saves allocating (and page-faulting in) a weight-sized tensor on every call of
// a training step. The returned tensor must not outlive the caller's use of it.
at::Tensor scratch_masked_weight(const at::Tensor& weight, const at::Tensor& mask_words) {
  thread_local std::vector<double> buffer;  // double: 8-byte alignment for every dtype
  const size_t need =
      (static_cast<size_t>(weight.numel()) * weight.element_size() + sizeof(double) - 1) / sizeof(double);
  if (buffer.size() < need) buffer.resize(need);
  at::Tensor out = at::from_blob(buffer.data(), weight.sizes(), weight.options());
  apply_mask_into(weight, mask_words, out);
  return out;
}

// MKL's thread-local thread count: the C entry that mkl_service.h names mkl_set_num_threads_local (the
// lower-case symbol itself is the Fortran one, taking a pointer). torch's x86 builds link MKL and export
// it; weak, so a build with another BLAS leaves it null.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// One BLAS thread for the calls made while it lives (on this thread only), where the BLAS is MKL.
// Inside a parallel region MKL may still split a tile's sum: measured on a Xeon, a 5 x 250 tile over
// 1000 rows rounded one way at 1, 3 and 4 threads and others at 2 and 8.
class OneBlasThread {
 public:
  OneBlasThread() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int prev_;
};

// a [R, Q] @ b [Q, C] (any strides) into a new contiguous [R, C] whose bits do not depend on the
// thread count. The platform GEMM, left to itself, may split the sum over Q across threads (it does
// for outputs of a few rows, as a weight gradient of a narrow layer over many rows), and 1 and 2
// threads then round differently. Here the output is cut into fixed tiles -- at most 256 x 256, at
// least two whenever it has two elements -- and each tile is one single-threaded GEMM call
// (OneBlasThread) run inside the parallel region: each tile is summed the same way whatever the
// number of threads.
at::Tensor deterministic_mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t r = a.size(0), q = a.size(1), c = b.size(1);
  at::Tensor out = at::empty({r, c}, a.options());
  if (r == 0 || c == 0) return out;
  if (q == 0) return out.zero_();
  constexpr int64_t kTile = 256;
  int64_t tr = (r + kTile - 1) / kTile, tc = (c + kTile - 1) / kTile;
  if (tr * tc == 1) {
    if (c >= 2) {
      tc = 2;
    } else if (r >= 2) {
      tr = 2;
    } else {  // a single dot product, summed in order
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "deterministic_mm", [&] {
        using A = acc_t<scalar_t>;
        const auto av = a.accessor<scalar_t, 2>();
        const auto bv = b.accessor<scalar_t, 2>();
        A sum = 0;
        for (int64_t i = 0; i < q; ++i) sum += static_cast<A>(av[0][i]) * static_cast<A>(bv[i][0]);
        out.fill_(static_cast<scalar_t>(sum));
      });
      return out;
    }
  }
  at::parallel_for(0, tr * tc, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / tc, j = t % tc;
      const int64_t r0 = i * r / tr, r1 = (i + 1) * r / tr, c0 = j * c / tc, c1 = (j + 1) * c / tc;
      at::Tensor tile = out.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
      c10::AutoGradMode no_grad(false);  // a kernel: autograd is recorded around it, never through it
      const OneBlasThread one_thread;
      at::mm_out(tile, a.narrow(0, r0, r1 - r0), b.narrow(1, c0, c1 - c0));
    }
  });
  return out;
}

}  // namespace

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_words,
                         const std::optional<at::Tensor>& bias) {
  check_linear(x, weight, mask_words, bias, "masked_linear");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t m_rows = k ? x.numel() / k : (x.dim() ? x.numel() : 1);
  const Forward kernel =
      x.scalar_type() == at::kFloat && k > 0 && n > 0 ? forward_kernel(m_rows, n, k) : Forward::kPlatformGemm;
  if (kernel == Forward::kPlatformGemm) {
    at::Tensor y = deterministic_mm(flat_rows(x), scratch_masked_weight(weight, mask_words).t());
    if (bias) y.add_(*bias);
    return y.reshape(with_last(x, n));
  }
  const at::Tensor xx = flat_rows(x), w = weight.contiguous(), mw = mask_words.contiguous();
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({xx.size(0), n}, x.options());
  if (kernel == Forward::kMaskedGemm) {
    masked_gemm_f32(xx.data_ptr<float>(), xx.size(0), k, w.data_ptr<float>(), word_ptr(mw), n, bp, y.data_ptr<float>());
  } else {
#if SUPSUP_AVX2
    fused_forward(xx.data_ptr<float>(), xx.size(0), k, w.data_ptr<float>(), word_ptr(mw), n, bp, y.data_ptr<float>());
#endif
  }
  return y.reshape(with_last(x, n));
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask_words) {
  const char* op = "masked_linear_grad_input";
  check_float(grad_out, op, "grad_out");
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got shape ", weight.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " != weight dtype ", weight.scalar_type());
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == weight.size(0), op, ": grad_out has shape ", grad_out.sizes(),
              "; its last dim must be N=", weight.size(0));
  check_words(mask_words, weight.size(0), weight.size(1), 0, op, "mask_words");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t m_rows = n ? grad_out.numel() / n : 0;
  const bool fp32 = grad_out.scalar_type() == at::kFloat && n > 0 && k > 0;
  const bool fused = SUPSUP_AVX2 && fp32 && m_rows <= kFusedGradMaxRows;
  const bool gemm = !fused && fp32 && n >= 32 && masked_gemm_wins(m_rows, n, k, 256);
  if (fused || gemm) {
    const at::Tensor g = flat_rows(grad_out), w = weight.contiguous(), mw = mask_words.contiguous();
    at::Tensor dx = at::empty({g.size(0), k}, grad_out.options());
    if (gemm) {
      masked_gemm_grad_input_f32(g.data_ptr<float>(), g.size(0), n, w.data_ptr<float>(), word_ptr(mw), k,
                                 dx.data_ptr<float>());
    } else {
#if SUPSUP_AVX2
      fused_grad_input(g.data_ptr<float>(), g.size(0), n, w.data_ptr<float>(), word_ptr(mw), k, dx.data_ptr<float>());
#endif
    }
    return dx.reshape(with_last(grad_out, k));
  }
  return deterministic_mm(flat_rows(grad_out), scratch_masked_weight(weight, mask_words))
      .reshape(with_last(grad_out, k));
}

namespace {

// One row (a GEMV's backward, M = 1): dL/dy^T x is an outer product, one rounded product per element
// whatever computes it, so it is fused with the epilogue in one pass -- the same bits as the GEMM
// path, without its tiles' set-up (most of a small layer's weight gradient).
at::Tensor outer_weight_grad(const at::Tensor& g, const at::Tensor& xx, const at::Tensor& w, const at::Tensor& sg) {
  const int64_t n = w.size(0), k = n ? w.numel() / n : 0;
  at::Tensor out = at::empty(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_grad", [&] {
    using A = acc_t<scalar_t>;
    const A* gs = g.data_ptr<A>();
    const A* xs = xx.data_ptr<A>();
    const scalar_t* ws = w.data_ptr<scalar_t>();
    const scalar_t* ss = sg.defined() ? sg.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const A gr = gs[r];
        const scalar_t* wr = ws + r * k;
        scalar_t* orow = o + r * k;
        if (ss == nullptr) {
          for (int64_t j = 0; j < k; ++j) {
            const A d = gr * xs[j];
            orow[j] = static_cast<scalar_t>(d * static_cast<A>(wr[j]));
          }
          continue;
        }
        const scalar_t* sr = ss + r * k;
        for (int64_t j = 0; j < k; ++j) {
          const A v = static_cast<A>(sr[j]);
          const A sign = v > A(0) ? A(1) : v < A(0) ? A(-1) : A(0);  // 0 for 0 and NaN, as torch.sign
          const A d = gr * xs[j];
          orow[j] = static_cast<scalar_t>(d * static_cast<A>(wr[j]) * sign);
        }
      }
    });
  });
  return out;
}

// (dL/dy^T x) * W, times sign(S) when `sign_of` is given (the top-k binariser's dM/dS), in the
// GEMM's epilogue: one parallel pass over the GEMM result.
at::Tensor weight_grad_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor* sign_of) {
  check_float(grad_out, op, "grad_out");
  check_float(x, op, "x");
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() >= 1, op, ": weight needs at least 1 dim [N, ...]");
  const int64_t n = weight.size(0), k = n ? weight.numel() / n : 0;
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == n, op, ": grad_out has shape ", grad_out.sizes(),
              "; its last dim must be N=", n);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x has shape ", x.sizes(), "; its last dim must be K=", k);
  TORCH_CHECK(grad_out.numel() / std::max<int64_t>(n, 1) == x.numel() / std::max<int64_t>(k, 1), op, ": grad_out ",
              grad_out.sizes(), " and x ", x.sizes(), " have different numbers of rows");
  at::Tensor sg;
  if (sign_of) {
    check_float(*sign_of, op, "scores");
    TORCH_CHECK(sign_of->sizes() == weight.sizes() && sign_of->scalar_type() == weight.scalar_type(), op,
                ": scores must match weight ", weight.sizes(), " ", weight.scalar_type(), ", got ", sign_of->sizes(),
                " ", sign_of->scalar_type());
    sg = sign_of->contiguous();
  }
  // float32 accumulation (float64 for float64), as the reference does for low precision
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_out.reshape({-1, n}).to(acc), xx = x.reshape({-1, k}).to(acc);
  const at::Tensor w = weight.contiguous();
  if (g.size(0) == 1) return outer_weight_grad(g.contiguous(), xx.contiguous(), w, sg);
  const at::Tensor dense = deterministic_mm(g.t(), xx);  // [N, K]
  // in the GEMM result's own buffer when no cast is needed
  at::Tensor out = w.scalar_type() == acc ? dense.view(w.sizes()) : at::empty(w.sizes(), w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight_grad", [&] {
    using A = acc_t<scalar_t>;
    const A* d = dense.data_ptr<A>();
    const scalar_t* ws = w.data_ptr<scalar_t>();
    const scalar_t* ss = sg.defined() ? sg.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, w.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
      if (ss == nullptr) {
        for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(d[i] * static_cast<A>(ws[i]));
        return;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const A v = static_cast<A>(ss[i]);
        const A sign = v > A(0) ? A(1) : v < A(0) ? A(-1) : A(0);  // 0 for 0 and NaN, as torch.sign
        o[i] = static_cast<scalar_t>(d[i] * static_cast<A>(ws[i]) * sign);
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor masked_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight) {
  return weight_grad_impl("masked_weight_grad", grad_out, x, weight, nullptr);
}

at::Tensor masked_weight_grad_sign(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& scores) {
  return weight_grad_impl("masked_weight_grad_sign", grad_out, x, weight, &scores);
}

at::Tensor masked_linear_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bank,
                                 const at::Tensor& task_ids, const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear_grouped";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got shape ", weight.sizes());
  check_words(bank, weight.size(0), weight.size(1), 1, op, "bank");
  TORCH_CHECK(task_ids.scalar_type() == at::kLong || task_ids.scalar_type() == at::kInt, op,
              ": task_ids must be int32/int64, got ", task_ids.scalar_type());
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == x.size(0), op, ": task_ids has shape ", task_ids.sizes(),
              ", expected [", x.size(0), "]");
  const int64_t m_rows = x.size(0), n = weight.size(0), t_count = bank.size(0);
  const at::Tensor ids = task_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  // bucket rows by task (counting sort, stable)
  std::vector<int64_t> count(t_count + 1, 0);
  for (int64_t i = 0; i < m_rows; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < t_count, op, ": task id ", id[i], " at row ", i, " is out of range [0, ", t_count,
                ")");
    ++count[id[i] + 1];
  }
  for (int64_t t = 0; t < t_count; ++t) count[t + 1] += count[t];
  at::Tensor order = at::empty({m_rows}, ids.options());
  int64_t* ord = order.data_ptr<int64_t>();
  {
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t i = 0; i < m_rows; ++i) ord[next[id[i]]++] = i;
  }
  at::Tensor y = at::empty({m_rows, n}, x.options());
  if (m_rows == 0) return y;
  for (int64_t t = 0; t < t_count; ++t) {
    const int64_t r0 = count[t], r1 = count[t + 1];
    if (r0 == r1) continue;
    const at::Tensor rows = order.slice(0, r0, r1);
    const at::Tensor yg = masked_linear(x.index_select(0, rows), weight, bank.select(0, t), bias);
    y.index_copy_(0, rows, yg);
  }
  return y;
}

at::Tensor masked_linear_seeded(const at::Tensor& x, const at::Tensor& mask_words, int64_t seed, int64_t layer,
                                double scale, const std::optional<at::Tensor>& bias) {
  const char* op = "masked_linear_seeded";
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x needs at least 1 dim [..., K]");
  TORCH_CHECK(mask_words.dim() == 2, op, ": mask_words must be [N, W], got shape ", mask_words.sizes());
  const int64_t n = mask_words.size(0), k = x.size(-1);
  check_words(mask_words, n, k, 0, op, "mask_words");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias shape ", bias->sizes(), " != (", n, ",)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
  }
  const uint32_t key = layer_key(seed, layer);
  const float c = static_cast<float>(scale);  // the reference builds +-scale in float32
  const at::Tensor mw = mask_words.contiguous();
  const uint32_t* bits = word_ptr(mw);
  const int64_t nw = mw.size(1);
  const int64_t m_rows = k ? x.numel() / k : 0;
#if SUPSUP_AVX2
  // the kernel masked_linear would run on the regenerated weight, so both give the same bits
  if (x.scalar_type() == at::kFloat && k > 0 && n > 0 && forward_kernel(m_rows, n, k) == Forward::kFused) {
    // one regenerated weight row at a time (in L1), never the whole weight
    const at::Tensor xx = flat_rows(x);
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    at::Tensor y = at::empty({xx.size(0), n}, x.options());
    const float* xp = xx.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t mr = xx.size(0);
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / k), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(k);
      for (int64_t j = n0; j < n1; ++j) {
        seeded_row<float>(j, k, key, c, -c, row.data());
        const float* bj = bp ? bp + j : nullptr;
        int64_t m = 0;
        for (; m + 4 <= mr; m += 4)
          fused_dot<4, 1>(xp + m * k, k, row.data(), bits + j * nw, nw, yp + m * n + j, n, bj);
        for (; m < mr; ++m) fused_dot<1, 1>(xp + m * k, k, row.data(), bits + j * nw, nw, yp + m * n + j, n, bj);
      }
    });
    return y.reshape(with_last(x, n));
  }
#endif
  at::Tensor w = at::empty({n, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_linear_seeded", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t pos = static_cast<scalar_t>(c), neg = static_cast<scalar_t>(-c);
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t j = n0; j < n1; ++j) seeded_row<scalar_t>(j, k, key, pos, neg, wp + j * k);
    });
  });
  return masked_linear(x, w, mask_words, bias);
}

}  // namespace supsup
