// Ternary kernels over a seed-regenerated signed-constant weight (supsup_fast/ternary.py):
//
//   y  = x (W * M)^T + b          ternary_linear
//   dx = dy (W * M)               ternary_linear_grad_input
//
// W[n, k] = +-c with its sign from the seed format (supsup_fast/seed_format.py), so W * M is
// ternary and the kernels read only the mask words: the sign word of 32 weights is one hash in
// version 2 (32 in version 1), computed in registers, never stored.
//
// Forward, lookup tables (T-MAC style): per group of 4 activations x'_{4g..4g+3} (x' = c x) the
// 16 partial sums T_g[b] = sum of x'_{4g+i} over the set bits i of b are built once per call;
// row n's positive weights P = M & S and negative weights Q = M & ~S then cost one table lookup
// per 4 weights each. SIMD lanes are rows: a 16x16 (AVX-512) or 8x8 (AVX2) transpose turns the
// rows' mask words into lane vectors, each nibble of a lane indexes the table broadcast over
// lanes (vpermps), and one lookup serves 16 (8) rows x 4 weights. The lookups, the index shifts
// and the sums share the vector pipes (the mask words are 1/32 of the dense layer's bytes and
// stay in cache); on AVX-512 the sums go through the FMA units (a + 1 b) to leave the add units
// to the rest. Measured on one Zen 4 core, 1024x1024, one row of x: 25 us, against 81 us for
// adding x' under the P / Q bits as AVX-512 lane masks (16 weights per masked add).
// VNNI is not used: its int8/int16 dot products would need quantised tables (as T-MAC's are),
// and the float32 result here is exact to a documented order.
//
// dL/dx: lanes are columns; each row's P and Q bits select, by AVX-512 mask registers (AVX2:
// blends), whether c dy[m, n] is added into the column accumulators. (A table over groups of 4
// rows would need a bit transpose per lookup, which costs more than the adds it saves.)
//
// Exact fp32 order (every ISA, thread count and row split gives the same bits; tests check it):
//   x'_k   = fl(c * x_k)                     (x'_k = 0 for K <= k < 32 ceil(K/32))
//   T_g[b] = (((0 + x'_{4g+i1}) + x'_{4g+i2}) + ...) over the set bits i1 < i2 < ... of b
//   P[n]   = (((0 + T_0[p_{n,0}]) + T_1[p_{n,1}]) + ...) over g = 0, 1, ..., 8 ceil(K/32) - 1,
//            p_{n,g} = bits 4g..4g+3 of row n's positive-weight bits; Q[n] likewise
//   y[n]   = fl(P[n] - Q[n]) (+ b[n], one more rounding)
//   dx[k]  = fl(P[k] - Q[k]), P[k] = (((0 + g'_{n1}) + g'_{n2}) + ...) over the rows n1 < n2 < ...
//            whose weight (n, k) is +c (Q: -c), g'_n = fl(c * dy_n)
// No product is fused into a sum (FMA instructions appear only as a + 1 b, which is a + b
// exactly), so the order above fixes every rounding.
// Non-finite inputs follow F.linear(x, W * M) with W finite: x is used densely (an Inf times a
// pruned weight is NaN), so a row of x holding a NaN or Inf is recomputed output by output from
// its non-finite entries alone (forward_nonfinite_rows; likewise for dL/dy).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed some intrinsics with an "undefined" vector, which its own
// -Wuninitialized then reports after inlining (as in masked_gemm.cpp)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu/avx512.h"
#include "cpu/bits.h"
#include "cpu/masked_gemm.h"
#include "cpu/ops.h"
#include "seed_format.h"

#include <atomic>
#include <functional>
#include <limits>
#include <utility>
#include <thread>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#define SUPSUP_TERNARY_AVX512 SUPSUP_AVX512_TARGET

namespace supsup {

namespace {

using supsup_seed::V2Keys;

constexpr int64_t kGroup = 4;  // activations per lookup table
constexpr int64_t kGroupsPerWord = kWordBits / kGroup;
constexpr int64_t kTable = 1 << kGroup;  // entries per table
constexpr int64_t kMaxRowsPerPass = 8;   // rows of x sharing one pass over the mask

// ---- which kernel runs (tests compare them) ----
enum Isa : int { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kScalar = 3 };
std::atomic<int> g_isa{kAuto};

Isa active_isa() {
  const int forced = g_isa.load(std::memory_order_relaxed);
  if (forced != kAuto) return static_cast<Isa>(forced);
  if (SUPSUP_TERNARY_AVX512 && masked_gemm_available()) return kAvx512;  // same switch as the masked GEMM
  return SUPSUP_AVX2 ? kAvx2 : kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kAvx512:
      return "avx512";
    case kAvx2:
      return "avx2";
    case kScalar:
      return "scalar";
    default:
      return "auto";
  }
}

// 64-byte aligned scratch owned by the calling thread (tables, scaled activations, keys).
struct Scratch {
  std::unique_ptr<char, decltype(&std::free)> data{nullptr, &std::free};
  size_t capacity = 0;
  char* get(size_t bytes) {
    if (bytes > capacity) {
      const size_t rounded = (bytes + 63) / 64 * 64;
      data.reset();
      char* p = static_cast<char*>(std::aligned_alloc(64, rounded));
      TORCH_CHECK(p != nullptr, "ternary kernels: out of memory allocating ", rounded, " bytes of scratch");
      data.reset(p);
      capacity = rounded;
    }
    return data.get();
  }
};

inline void compiler_fence() {
#if defined(__GNUC__) || defined(__clang__)
  asm volatile("" ::: "memory");  // keeps fl(c * x) from being fused into a later sum
#endif
}

// The seed side of a call: which version, its keys, and the per-word column hashes.
struct Seed {
  int version;
  uint32_t key;         // version 1
  V2Keys keys;          // version 2
  uint32_t k32;         // K mod 2^32 (version 1's flat index n K + k)
  const uint32_t* col;  // version 2: C(j) for every word column
};

// Scalar sign word of (n, j): the reference for the SIMD versions below.
inline uint32_t sign_word(const Seed& s, int64_t n, int64_t j) {
  if (s.version == 2) return supsup_seed::v2_sign_word(supsup_seed::v2_row(s.keys, static_cast<uint32_t>(n)), s.col[j]);
  const uint32_t base = static_cast<uint32_t>(n) * s.k32 + static_cast<uint32_t>(j * kWordBits);
  uint32_t w = 0;
  for (uint32_t i = 0; i < 32; ++i) w |= static_cast<uint32_t>(supsup_seed::v1_sign(base + i, s.key)) << i;
  return w;
}

// ======================================================================================
// Forward: tables
// ======================================================================================
// T[b] for one group of 4 values a: T[b | 2^i] = T[b] + a_i for b < 2^i, i.e. the set bits of b
// added from the lowest up, starting from +0, as documented.
inline void group_table_scalar(const float* a, float* t) {
  t[0] = 0.f;
  for (int i = 0; i < kGroup; ++i)
    for (int b = 0; b < (1 << i); ++b) t[b | (1 << i)] = t[b] + a[i];
}

#if SUPSUP_AVX2
// The same sums, 8 entries a vector: lanes without bit i add +0, which leaves every partial sum
// as it is (a sum starting from +0 is never -0).
inline void group_table_avx2(const float* a, float* t) {
  const __m256 bit0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
  const __m256 bit1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  const __m256 bit2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
  __m256 lo = _mm256_and_ps(_mm256_set1_ps(a[0]), bit0);
  lo = _mm256_add_ps(lo, _mm256_and_ps(_mm256_set1_ps(a[1]), bit1));
  lo = _mm256_add_ps(lo, _mm256_and_ps(_mm256_set1_ps(a[2]), bit2));
  _mm256_store_ps(t, lo);
  _mm256_store_ps(t + 8, _mm256_add_ps(lo, _mm256_set1_ps(a[3])));
}
#endif

#if SUPSUP_TERNARY_AVX512
SUPSUP_AVX512_FN inline void group_table_avx512(const float* a, float* t) {
  __m512 v = _mm512_maskz_mov_ps(0xAAAA, _mm512_set1_ps(a[0]));  // 0 + a0 == a0 on the lanes with bit 0
  v = _mm512_mask_add_ps(v, 0xCCCC, v, _mm512_set1_ps(a[1]));
  v = _mm512_mask_add_ps(v, 0xF0F0, v, _mm512_set1_ps(a[2]));
  v = _mm512_mask_add_ps(v, 0xFF00, v, _mm512_set1_ps(a[3]));
  _mm512_store_ps(t, v);
}

SUPSUP_AVX512_FN void group_tables_avx512(const float* xs, int64_t mb, int64_t kp, int64_t groups, float* tables) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t m = 0; m < mb; ++m) group_table_avx512(xs + m * kp + g * kGroup, tables + (g * mb + m) * kTable);
}
#endif

// xs [mb][32 nw] = fl(c x), zero past k; tables [8 nw][mb][16] in the documented order.
void build_tables(const float* x, int64_t mb, int64_t k, int64_t nw, float c, float* xs, float* tables, Isa isa) {
  const int64_t kp = nw * kWordBits;
  for (int64_t m = 0; m < mb; ++m) {
    for (int64_t i = 0; i < k; ++i) xs[m * kp + i] = c * x[m * k + i];
    for (int64_t i = k; i < kp; ++i) xs[m * kp + i] = 0.f;
  }
  compiler_fence();
  const int64_t groups = nw * kGroupsPerWord;
#if SUPSUP_TERNARY_AVX512
  if (isa == kAvx512) return group_tables_avx512(xs, mb, kp, groups, tables);
#endif
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t m = 0; m < mb; ++m) {
      const float* a = xs + m * kp + g * kGroup;
      float* t = tables + (g * mb + m) * kTable;
#if SUPSUP_AVX2
      if (isa == kAvx2) {
        group_table_avx2(a, t);
        continue;
      }
#endif
      group_table_scalar(a, t);
    }
}

struct Forward {
  const float* tables;   // [8 nw][mb][16]
  const uint32_t* mask;  // [n][nw]
  const float* bias;     // [n] or null
  float* y;              // rows of y for this pass, row stride n
  int64_t n, nw, mb;
  Seed seed;
};

inline float finish(float p, float q, const float* bias, int64_t row) {
  const float d = p - q;
  return bias ? d + bias[row] : d;
}

// Runs body(b0, b1) over [0, count) in chunks of `grain`: the calling thread and up to
// at::get_num_threads() - 1 tasks on torch's inter-op pool claim chunks from a shared counter,
// and the caller waits only for chunks a helper has claimed, never for a helper that has not
// started. (An OpenMP team's closing barrier waits for every thread of the team: on a machine
// whose cores other processes keep busy, a worker the scheduler has not yet run stalled
// at::parallel_for calls of ~50 us for 4-25 ms.) Each chunk's result does not depend on who
// computes it, so the output is the same for any thread count.
template <class Body>
void run_chunks(int64_t count, int64_t grain, const Body& body) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (count + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), chunks) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    if (count > 0) body(0, count);
    return;
  }
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0, grain = 0, count = 0;
    std::function<void(int64_t, int64_t)> body;
    bool work() {  // one chunk, or false when none is left
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return false;
      body(c * grain, std::min(count, (c + 1) * grain));
      done.fetch_add(1, std::memory_order_release);
      return true;
    }
  };
  auto job = std::make_shared<Job>();
  job->chunks = chunks, job->grain = grain, job->count = count;
  job->body = [&body](int64_t b0, int64_t b1) { body(b0, b1); };  // only called while the caller waits
  for (int64_t h = 0; h < helpers; ++h)
    at::launch([job] {
      while (job->work()) {
      }
    });
  while (job->work()) {
  }
  while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// ---- scalar: one row at a time ----
void forward_rows_scalar(const Forward& f, int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    float P[kMaxRowsPerPass] = {}, Q[kMaxRowsPerPass] = {};
    for (int64_t j = 0; j < f.nw; ++j) {
      const uint32_t m = f.mask[row * f.nw + j], s = sign_word(f.seed, row, j);
      const uint32_t pw = m & s, qw = m & ~s;
      for (int64_t q = 0; q < kGroupsPerWord; ++q) {
        const float* t = f.tables + ((j * kGroupsPerWord + q) * f.mb) * kTable;
        const uint32_t ip = (pw >> (kGroup * q)) & (kTable - 1), iq = (qw >> (kGroup * q)) & (kTable - 1);
        for (int64_t mm = 0; mm < f.mb; ++mm) {
          P[mm] += t[mm * kTable + ip];
          Q[mm] += t[mm * kTable + iq];
        }
      }
    }
    for (int64_t mm = 0; mm < f.mb; ++mm) f.y[mm * f.n + row] = finish(P[mm], Q[mm], f.bias, row);
  }
}

#if SUPSUP_AVX2
// ---- AVX2: 8 rows per vector, R vectors per block ----
inline __m256i hash8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}

// r[j] lane i <- r[i] lane j (8 x 8 dwords).
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

inline __m256i lanes_below(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Sign words of word j for the 8 rows of `rowv` (v2: R(n); v1: n K mod 2^32).
inline __m256i sign_words8(const Seed& s, __m256i rowv, int64_t j) {
  if (s.version == 2) return hash8(_mm256_xor_si256(rowv, _mm256_set1_epi32(static_cast<int>(s.col[j]))));
  const __m256i base = _mm256_add_epi32(rowv, _mm256_set1_epi32(static_cast<int>(j * kWordBits)));
  const __m256i key = _mm256_set1_epi32(static_cast<int>(s.key)), one = _mm256_set1_epi32(1);
  __m256i w = _mm256_setzero_si256();
  for (int i = 0; i < 32; ++i) {
    const __m256i h = hash8(_mm256_xor_si256(_mm256_add_epi32(base, _mm256_set1_epi32(i)), key));
    w = _mm256_or_si256(w, _mm256_sll_epi32(_mm256_and_si256(h, one), _mm_cvtsi32_si128(i)));
  }
  return w;
}

inline __m256i row_vector8(const Seed& s, int64_t n0) {
  const __m256i rows =
      _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(n0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (s.version == 2) return hash8(_mm256_xor_si256(rows, _mm256_set1_epi32(static_cast<int>(s.keys.row))));
  return _mm256_mullo_epi32(rows, _mm256_set1_epi32(static_cast<int>(s.k32)));
}

// 16-entry lookup with 8-entry permutes: the low or high half by bit 3 of each index.
inline __m256 lookup16(const float* t, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(t), idx);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MB, int R>
void forward_block_avx2(const Forward& f, int64_t n0) {
  constexpr int L = 8;
  __m256 accP[R][MB], accQ[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) accP[r][m] = accQ[r][m] = _mm256_setzero_ps();
  __m256i rowv[R];
  for (int r = 0; r < R; ++r) rowv[r] = row_vector8(f.seed, n0 + r * L);
  alignas(32) int32_t V[R][L][L];
  for (int64_t jc = 0; jc < f.nw; jc += L) {
    const int64_t cnt = std::min<int64_t>(L, f.nw - jc);
    const __m256i in_row = lanes_below(cnt);
    for (int r = 0; r < R; ++r) {
      __m256 w[L];
      for (int i = 0; i < L; ++i) {
        const int64_t row = n0 + r * L + i;
        w[i] = row < f.n ? _mm256_castsi256_ps(
                               _mm256_maskload_epi32(reinterpret_cast<const int*>(f.mask + row * f.nw + jc), in_row))
                         : _mm256_setzero_ps();
      }
      transpose8(w);
      for (int i = 0; i < L; ++i) _mm256_store_ps(reinterpret_cast<float*>(V[r][i]), w[i]);
    }
    for (int64_t jj = 0; jj < cnt; ++jj) {
      const int64_t j = jc + jj;
      __m256i P[R], Q[R];
      for (int r = 0; r < R; ++r) {
        const __m256i m = _mm256_load_si256(reinterpret_cast<const __m256i*>(V[r][jj]));
        const __m256i s = sign_words8(f.seed, rowv[r], j);
        P[r] = _mm256_and_si256(m, s);
        Q[r] = _mm256_andnot_si256(s, m);
      }
      const float* t = f.tables + j * kGroupsPerWord * MB * kTable;
      for (int q = 0; q < kGroupsPerWord; ++q, t += MB * kTable) {
        for (int m = 0; m < MB; ++m)
          for (int r = 0; r < R; ++r) {
            accP[r][m] = _mm256_add_ps(accP[r][m], lookup16(t + m * kTable, P[r]));
            accQ[r][m] = _mm256_add_ps(accQ[r][m], lookup16(t + m * kTable, Q[r]));
          }
        for (int r = 0; r < R; ++r) {
          P[r] = _mm256_srli_epi32(P[r], kGroup);
          Q[r] = _mm256_srli_epi32(Q[r], kGroup);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t row0 = n0 + r * L;
    if (row0 >= f.n) break;
    const __m256i live = lanes_below(f.n - row0);
    const __m256 b = f.bias ? _mm256_maskload_ps(f.bias + row0, live) : _mm256_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      __m256 d = _mm256_sub_ps(accP[r][m], accQ[r][m]);
      if (f.bias) d = _mm256_add_ps(d, b);
      _mm256_maskstore_ps(f.y + m * f.n + row0, live, d);
    }
  }
}
#endif

#if SUPSUP_TERNARY_AVX512
// ---- AVX-512: 16 rows per vector, R vectors per block ----
SUPSUP_AVX512_FN inline __m512i hash16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  return x;
}

SUPSUP_AVX512_FN inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << count) - 1);
}

SUPSUP_AVX512_FN inline __m512i lane_index16() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

SUPSUP_AVX512_FN inline __m512i sign_words16(const Seed& s, __m512i rowv, int64_t j) {
  if (s.version == 2) return hash16(_mm512_xor_si512(rowv, _mm512_set1_epi32(static_cast<int>(s.col[j]))));
  const __m512i base = _mm512_add_epi32(rowv, _mm512_set1_epi32(static_cast<int>(j * kWordBits)));
  const __m512i key = _mm512_set1_epi32(static_cast<int>(s.key)), one = _mm512_set1_epi32(1);
  __m512i w = _mm512_setzero_si512();
  for (int i = 0; i < 32; ++i) {
    const __m512i h = hash16(_mm512_xor_si512(_mm512_add_epi32(base, _mm512_set1_epi32(i)), key));
    w = _mm512_mask_or_epi32(w, _mm512_test_epi32_mask(h, one), w, _mm512_set1_epi32(static_cast<int>(1u << i)));
  }
  return w;
}

SUPSUP_AVX512_FN inline __m512i row_vector16(const Seed& s, int64_t n0) {
  const __m512i rows = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(n0)), lane_index16());
  if (s.version == 2) return hash16(_mm512_xor_si512(rows, _mm512_set1_epi32(static_cast<int>(s.keys.row))));
  return _mm512_mullo_epi32(rows, _mm512_set1_epi32(static_cast<int>(s.k32)));
}

template <int MB, int R>
SUPSUP_AVX512_FN void forward_block_avx512(const Forward& f, int64_t n0) {
  constexpr int L = 16;
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 accP[R][MB], accQ[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) accP[r][m] = accQ[r][m] = _mm512_setzero_ps();
  __m512i rowv[R];
  for (int r = 0; r < R; ++r) rowv[r] = row_vector16(f.seed, n0 + r * L);
  alignas(64) int32_t V[R][L][L];
  for (int64_t jc = 0; jc < f.nw; jc += L) {
    const int64_t cnt = std::min<int64_t>(L, f.nw - jc);
    const __mmask16 in_row = first_lanes(cnt);
    for (int r = 0; r < R; ++r) {
      __m512 w[L];
      for (int i = 0; i < L; ++i) {
        const int64_t row = n0 + r * L + i;
        w[i] = row < f.n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(in_row, f.mask + row * f.nw + jc))
                         : _mm512_setzero_ps();
      }
      transpose16(w);
      for (int i = 0; i < L; ++i) _mm512_store_ps(reinterpret_cast<float*>(V[r][i]), w[i]);
    }
    for (int64_t jj = 0; jj < cnt; ++jj) {
      const int64_t j = jc + jj;
      __m512i P[R], Q[R];
      for (int r = 0; r < R; ++r) {
        const __m512i m = _mm512_load_si512(V[r][jj]);
        const __m512i s = sign_words16(f.seed, rowv[r], j);
        P[r] = _mm512_and_si512(m, s);
        Q[r] = _mm512_andnot_si512(s, m);
      }
      const float* t = f.tables + j * kGroupsPerWord * MB * kTable;
      for (int q = 0; q < kGroupsPerWord; ++q, t += MB * kTable) {
        for (int m = 0; m < MB; ++m) {
          const __m512 tab = _mm512_load_ps(t + m * kTable);
          for (int r = 0; r < R; ++r) {
            // a + 1 * b == a + b exactly; on the FMA pipes, which the permutes and shifts leave free
            accP[r][m] = _mm512_fmadd_ps(_mm512_permutexvar_ps(P[r], tab), one, accP[r][m]);
            accQ[r][m] = _mm512_fmadd_ps(_mm512_permutexvar_ps(Q[r], tab), one, accQ[r][m]);
          }
        }
        for (int r = 0; r < R; ++r) {
          P[r] = _mm512_srli_epi32(P[r], kGroup);
          Q[r] = _mm512_srli_epi32(Q[r], kGroup);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t row0 = n0 + r * L;
    if (row0 >= f.n) break;
    const __mmask16 live = first_lanes(f.n - row0);
    const __m512 b = f.bias ? _mm512_maskz_loadu_ps(live, f.bias + row0) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      __m512 d = _mm512_sub_ps(accP[r][m], accQ[r][m]);
      if (f.bias) d = _mm512_add_ps(d, b);
      _mm512_mask_storeu_ps(f.y + m * f.n + row0, live, d);
    }
  }
}
#endif

// Row vectors per block (independent accumulator chains sharing each table load) by rows of
// x per pass, measured on a 2-core Zen 4: AVX-512 4 / 2 / 2 / 2 / 1.., AVX2 (16 registers) 2 / 1...
template <int MB>
void forward_pass_mb(const Forward& f, Isa isa) {
  constexpr int R512 = MB == 1 ? 4 : MB <= 4 ? 2 : 1;
  constexpr int R256 = MB == 1 ? 2 : 1;
  const int64_t block = isa == kAvx512 ? 16 * R512 : isa == kAvx2 ? 8 * R256 : 1;
  const int64_t blocks = (f.n + block - 1) / block;
  // >= 2M weight-rows per task (~50 us on one Zen 4 core): a second thread then saves more than
  // its start-up and wake-up cost, also when other processes share the cores (where smaller
  // splits measured slower than one thread)
  const int64_t per_block = block * f.nw * kWordBits * MB;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(per_block, 1));
  run_chunks(blocks, grain, [&](int64_t b0, int64_t b1) {
    if (isa == kScalar) {
      forward_rows_scalar(f, b0, b1);
      return;
    }
    for (int64_t b = b0; b < b1; ++b) {
#if SUPSUP_TERNARY_AVX512
      if (isa == kAvx512) {
        forward_block_avx512<MB, R512>(f, b * block);
        continue;
      }
#endif
#if SUPSUP_AVX2
      forward_block_avx2<MB, R256>(f, b * block);
#endif
    }
  });
}

void forward_pass(const Forward& f, Isa isa) {
  switch (f.mb) {
    case 1:
      return forward_pass_mb<1>(f, isa);
    case 2:
      return forward_pass_mb<2>(f, isa);
    case 3:
      return forward_pass_mb<3>(f, isa);
    case 4:
      return forward_pass_mb<4>(f, isa);
    case 5:
      return forward_pass_mb<5>(f, isa);
    case 6:
      return forward_pass_mb<6>(f, isa);
    case 7:
      return forward_pass_mb<7>(f, isa);
    default:
      return forward_pass_mb<8>(f, isa);
  }
}

// ======================================================================================
// dL/dx
// ======================================================================================
struct Backward {
  const float* g;        // fl(c dy) [mb][n] for this pass
  const uint32_t* mask;  // [n][nw]
  const uint32_t* rowh;  // version 2: R(n) for every row
  float* dx;             // rows of dx for this pass, row stride k
  int64_t n, nw, k, mb;
  Seed seed;
};

inline uint32_t sign_word_bwd(const Backward& b, int64_t n, int64_t j) {
  if (b.seed.version == 2) return supsup_seed::v2_sign_word(b.rowh[n], b.seed.col[j]);
  return sign_word(b.seed, n, j);
}

void grad_words_scalar(const Backward& b, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t c0 = j * kWordBits, cols = std::min<int64_t>(kWordBits, b.k - c0);
    for (int64_t mm = 0; mm < b.mb; ++mm) {
      float P[kWordBits] = {}, Q[kWordBits] = {};
      for (int64_t n = 0; n < b.n; ++n) {
        const uint32_t m = b.mask[n * b.nw + j], s = sign_word_bwd(b, n, j);
        const float g = b.g[mm * b.n + n];
        for (int i = 0; i < kWordBits; ++i) {
          if ((m & s) >> i & 1u) P[i] += g;
          if ((m & ~s) >> i & 1u) Q[i] += g;
        }
      }
      for (int64_t i = 0; i < cols; ++i) b.dx[mm * b.k + c0 + i] = P[i] - Q[i];
    }
  }
}

#if SUPSUP_AVX2
// Columns 32j .. 32j+31 for MB rows of dy; blends select g where a bit is set.
template <int MB>
void grad_word_avx2(const Backward& b, int64_t j) {
  const BitLanes L;
  __m256 accP[MB][4], accQ[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) accP[m][q] = accQ[m][q] = _mm256_setzero_ps();
  for (int64_t n = 0; n < b.n; ++n) {
    const uint32_t mw = b.mask[n * b.nw + j];
    if (mw == 0) continue;  // adding +0 everywhere would change nothing
    const uint32_t s = sign_word_bwd(b, n, j);
    const __m256i pv = _mm256_set1_epi32(static_cast<int>(mw & s)), qv = _mm256_set1_epi32(static_cast<int>(mw & ~s));
    for (int m = 0; m < MB; ++m) {
      const __m256 g = _mm256_set1_ps(b.g[m * b.n + n]);
      for (int q = 0; q < 4; ++q) {
        accP[m][q] = _mm256_add_ps(accP[m][q], masked8(g, L.sel(pv, q)));
        accQ[m][q] = _mm256_add_ps(accQ[m][q], masked8(g, L.sel(qv, q)));
      }
    }
  }
  const int64_t c0 = j * kWordBits, cols = std::min<int64_t>(kWordBits, b.k - c0);
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < 4; ++q) {
      const int64_t left = cols - 8 * q;
      if (left <= 0) break;
      _mm256_maskstore_ps(b.dx + m * b.k + c0 + 8 * q, lanes_below(left), _mm256_sub_ps(accP[m][q], accQ[m][q]));
    }
}
#endif

#if SUPSUP_TERNARY_AVX512
// Columns 32j .. 32(j+JS)-1 for MB rows of dy: the P and Q bits are the add masks.
template <int MB, int JS>
SUPSUP_AVX512_FN void grad_words_avx512(const Backward& b, int64_t j) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 accP[MB][JS][2], accQ[MB][JS][2];
  for (int m = 0; m < MB; ++m)
    for (int s = 0; s < JS; ++s) accP[m][s][0] = accP[m][s][1] = accQ[m][s][0] = accQ[m][s][1] = _mm512_setzero_ps();
  alignas(64) uint32_t sw[JS][16];
  for (int64_t n0 = 0; n0 < b.n; n0 += 16) {
    const int64_t rows = std::min<int64_t>(16, b.n - n0);
    // the sign words of 16 rows at once (lanes are rows)
    for (int s = 0; s < JS; ++s) {
      __m512i v;
      if (b.seed.version == 2) {
        const __m512i r = _mm512_maskz_loadu_epi32(first_lanes(rows), b.rowh + n0);
        v = hash16(_mm512_xor_si512(r, _mm512_set1_epi32(static_cast<int>(b.seed.col[j + s]))));
      } else {
        v = sign_words16(b.seed, row_vector16(b.seed, n0), j + s);
      }
      _mm512_store_si512(sw[s], v);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t n = n0 + i;
      __m512 g[MB];
      for (int m = 0; m < MB; ++m) g[m] = _mm512_set1_ps(b.g[m * b.n + n]);
      for (int s = 0; s < JS; ++s) {
        const uint32_t mw = b.mask[n * b.nw + j + s], pw = mw & sw[s][i], qw = mw & ~sw[s][i];
        const __mmask16 p0 = static_cast<__mmask16>(pw), p1 = static_cast<__mmask16>(pw >> 16);
        const __mmask16 q0 = static_cast<__mmask16>(qw), q1 = static_cast<__mmask16>(qw >> 16);
        for (int m = 0; m < MB; ++m) {
          accP[m][s][0] = _mm512_mask_add_ps(accP[m][s][0], p0, accP[m][s][0], g[m]);
          accP[m][s][1] = _mm512_mask_add_ps(accP[m][s][1], p1, accP[m][s][1], g[m]);
          // masked a + 1 * g == masked a + g: on the FMA pipes, beside the adds
          accQ[m][s][0] = _mm512_mask3_fmadd_ps(g[m], one, accQ[m][s][0], q0);
          accQ[m][s][1] = _mm512_mask3_fmadd_ps(g[m], one, accQ[m][s][1], q1);
        }
      }
    }
  }
  for (int s = 0; s < JS; ++s) {
    const int64_t c0 = (j + s) * kWordBits;
    for (int h = 0; h < 2; ++h) {
      const __mmask16 live = first_lanes(b.k - c0 - 16 * h);
      for (int m = 0; m < MB; ++m)
        _mm512_mask_storeu_ps(b.dx + m * b.k + c0 + 16 * h, live, _mm512_sub_ps(accP[m][s][h], accQ[m][s][h]));
    }
  }
}
#endif

// AVX-512 strips: 4 words for one row of dy, 2 for 2, 1 for 3-4 (16 accumulators in each case).
template <int MB>
void grad_pass_mb(const Backward& b, Isa isa) {
  constexpr int64_t JS = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  const int64_t strip = isa == kAvx512 ? JS : 1;
  const int64_t strips = (b.nw + strip - 1) / strip;
  const int64_t per_strip = strip * kWordBits * b.n * MB;  // >= 1M weight-rows per task (~40 us)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(per_strip, 1));
  run_chunks(strips, grain, [&](int64_t s0, int64_t s1) {
    if (isa == kScalar) {
      grad_words_scalar(b, s0, s1);
      return;
    }
    for (int64_t s = s0; s < s1; ++s) {
#if SUPSUP_TERNARY_AVX512
      if (isa == kAvx512) {
        if (s * JS + JS <= b.nw)
          grad_words_avx512<MB, JS>(b, s * JS);
        else
          for (int64_t j = s * JS; j < b.nw; ++j) grad_words_avx512<MB, 1>(b, j);
        continue;
      }
#endif
#if SUPSUP_AVX2
      grad_word_avx2<MB>(b, s);
#endif
    }
  });
}

// ======================================================================================
// Non-finite inputs: x (and dL/dy) are used densely, as F.linear(x, W * M) uses them
// ======================================================================================
inline bool is_nonfinite(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7F800000u) == 0x7F800000u;
}

// Whether any of v[0..count) is NaN or +-Inf (an integer test, so the loop vectorises).
inline bool any_nonfinite(const float* v, int64_t count) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t u;
    std::memcpy(&u, v + i, sizeof u);
    bad |= static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
  }
  return bad != 0;
}

// The IEEE value of sum_i v_i w_i when some v_i are NaN or +-Inf and every w_i is finite (+c,
// -c, or an exact 0 where the mask prunes): NaN if a v_i is NaN, or an infinite v_i meets a zero
// weight (Inf * 0), or infinities of both signs meet; else an infinity of their sign. The finite
// terms cannot change it. `weight_sign(i)` is +1, -1 or 0 for the weight of the i-th non-finite v.
template <class WeightSign>
float nonfinite_dot(const std::vector<std::pair<int64_t, float>>& bad, float c, const WeightSign& weight_sign) {
  int seen = 0;  // +1 / -1: the sign of the infinities so far
  for (const auto& [i, v] : bad) {
    if (v != v) return std::numeric_limits<float>::quiet_NaN();
    const int w = c == 0.f ? 0 : weight_sign(i) * (c > 0.f ? 1 : -1);
    if (w == 0) return std::numeric_limits<float>::quiet_NaN();
    const int term = (v > 0.f ? 1 : -1) * w;
    if (seen != 0 && term != seen) return std::numeric_limits<float>::quiet_NaN();
    seen = term;
  }
  return seen > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
}

// y rows of x rows that hold a NaN or Inf: recomputed by nonfinite_dot (plus the bias) for every
// output, as the tables cannot say which of their sums met an Inf times a pruned weight.
void forward_nonfinite_rows(const float* x, int64_t m_rows, int64_t k, const uint32_t* mask, int64_t n, int64_t nw,
                            const Seed& s, float c, const float* bias, float* y) {
  std::vector<std::pair<int64_t, float>> bad;
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xr = x + m * k;
    if (!any_nonfinite(xr, k)) continue;
    bad.clear();
    for (int64_t i = 0; i < k; ++i)
      if (is_nonfinite(xr[i])) bad.emplace_back(i, xr[i]);
    for (int64_t row = 0; row < n; ++row) {
      const float v = nonfinite_dot(bad, c, [&](int64_t i) {
        const int64_t j = i / kWordBits;
        const uint32_t bit = 1u << (i % kWordBits);
        if (!(mask[row * nw + j] & bit)) return 0;
        return (sign_word(s, row, j) & bit) ? 1 : -1;
      });
      y[m * n + row] = bias ? v + bias[row] : v;
    }
  }
}

// dx rows of dL/dy rows that hold a NaN or Inf, likewise.
void grad_nonfinite_rows(const float* g, int64_t m_rows, int64_t n, const uint32_t* mask, int64_t k, int64_t nw,
                         const Seed& s, float c, float* dx) {
  std::vector<std::pair<int64_t, float>> bad;
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* gr = g + m * n;
    if (!any_nonfinite(gr, n)) continue;
    bad.clear();
    for (int64_t i = 0; i < n; ++i)
      if (is_nonfinite(gr[i])) bad.emplace_back(i, gr[i]);
    for (int64_t col = 0; col < k; ++col) {
      const int64_t j = col / kWordBits;
      const uint32_t bit = 1u << (col % kWordBits);
      dx[m * k + col] = nonfinite_dot(bad, c, [&](int64_t row) {
        if (!(mask[row * nw + j] & bit)) return 0;
        return (sign_word(s, row, j) & bit) ? 1 : -1;
      });
    }
  }
}

// ======================================================================================
// Checks and set-up shared by the ops
// ======================================================================================
void check_version(int64_t v, const char* op) {
  TORCH_CHECK(v == 1 || v == 2, op, ": seed format_version must be 1 or 2, got ", v);
}

void check_fp32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name,
              " must be float32 (the ternary kernels accumulate in fp32); got ", t.scalar_type(),
              ". supsup_fast.ternary.ternary_linear serves other dtypes through the reference.");
}

void check_size_limits(int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(n <= (int64_t(1) << 32) && words_per_row(k) <= (int64_t(1) << 32), op, ": [N=", n, ", K=", k,
              "] exceeds the 2^32 rows / words the seed hash counts");
  TORCH_CHECK(k < (int64_t(1) << 31) / 16 && n < (int64_t(1) << 31), op, ": [N=", n, ", K=", k,
              "] is too large for the ternary kernels' 32-bit lane indices");
}

// Keys plus the column hashes C(j) in `col` (nw entries, version 2).
Seed make_seed(int64_t version, int64_t seed, int64_t layer, int64_t k, int64_t nw, uint32_t* col) {
  Seed s{static_cast<int>(version), supsup_seed::layer_key(seed, layer), supsup_seed::v2_keys(seed, layer),
         static_cast<uint32_t>(k), col};
  if (version == 2)
    for (int64_t j = 0; j < nw; ++j) col[j] = supsup_seed::v2_column(s.keys, static_cast<uint32_t>(j));
  return s;
}

size_t align64(size_t bytes) {
  return (bytes + 63) / 64 * 64;
}

// t's elements in row-major order: its own storage when contiguous, else a copy kept in `keep`.
template <typename T>
const T* dense_data(const at::Tensor& t, at::Tensor& keep) {
  if (t.is_contiguous()) return t.data_ptr<T>();
  keep = t.contiguous();
  return keep.data_ptr<T>();
}

void check_scale(double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

}  // namespace

// ======================================================================================
// Ops
// ======================================================================================
at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& mask_words, int64_t seed, int64_t layer, double scale,
                          const std::optional<at::Tensor>& bias, int64_t format_version) {
  const char* op = "ternary_linear";
  check_version(format_version, op);
  check_scale(scale, op);
  check_fp32(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x needs at least 1 dim [..., K]");
  TORCH_CHECK(mask_words.dim() == 2, op, ": mask_words must be [N, ceil(K/32)], got shape ", mask_words.sizes());
  const int64_t n = mask_words.size(0), k = x.size(-1);
  check_words(mask_words, n, k, 0, op, "mask_words");
  check_size_limits(n, k, op);
  if (bias) {
    check_fp32(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias has shape ", bias->sizes(), ", expected [", n, "]");
  }
  int64_t m_rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m_rows *= x.size(d);
  const int64_t nw = words_per_row(k);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options());
  if (m_rows == 0 || n == 0) return y;
  if (k == 0) {  // no products: y is the bias
    if (bias)
      y.copy_(bias->expand_as(y));
    else
      y.zero_();
    return y;
  }
  at::Tensor x_copy, mask_copy, bias_copy;  // only where an input is not contiguous
  const float* xp = dense_data<float>(x, x_copy);
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(dense_data<int32_t>(mask_words, mask_copy));
  const float* bp = bias ? dense_data<float>(*bias, bias_copy) : nullptr;
  const Isa isa = active_isa();
  const int64_t pass_rows = std::min(m_rows, kMaxRowsPerPass);
  thread_local Scratch scratch;
  const size_t col_bytes = align64(nw * sizeof(uint32_t));
  const size_t xs_bytes = align64(pass_rows * nw * kWordBits * sizeof(float));
  const size_t tab_bytes = static_cast<size_t>(nw * kGroupsPerWord * pass_rows * kTable) * sizeof(float);
  char* base = scratch.get(col_bytes + xs_bytes + tab_bytes);
  uint32_t* col = reinterpret_cast<uint32_t*>(base);
  float* xs = reinterpret_cast<float*>(base + col_bytes);
  float* tables = reinterpret_cast<float*>(base + col_bytes + xs_bytes);
  const Seed s = make_seed(format_version, seed, layer, k, nw, col);
  const float c = static_cast<float>(scale);
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRowsPerPass) {
    const int64_t mb = std::min(kMaxRowsPerPass, m_rows - m0);
    build_tables(xp + m0 * k, mb, k, nw, c, xs, tables, isa);
    const Forward f{tables, mp, bp, yp + m0 * n, n, nw, mb, s};
    forward_pass(f, isa);
  }
  forward_nonfinite_rows(xp, m_rows, k, mp, n, nw, s, c, bp, yp);
  return y;
}

at::Tensor ternary_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& mask_words, int64_t k, int64_t seed,
                                     int64_t layer, double scale, int64_t format_version) {
  const char* op = "ternary_linear_grad_input";
  check_version(format_version, op);
  check_scale(scale, op);
  check_fp32(grad_out, op, "grad_out");
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK(mask_words.dim() == 2, op, ": mask_words must be [N, ceil(K/32)], got shape ", mask_words.sizes());
  const int64_t n = mask_words.size(0);
  check_words(mask_words, n, k, 0, op, "mask_words");
  check_size_limits(n, k, op);
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == n, op, ": grad_out has shape ", grad_out.sizes(),
              "; its last dim must be N=", n);
  int64_t m_rows = 1;
  for (int64_t d = 0; d + 1 < grad_out.dim(); ++d) m_rows *= grad_out.size(d);
  const int64_t nw = words_per_row(k);
  auto out_shape = grad_out.sizes().vec();
  out_shape.back() = k;
  at::Tensor dx = at::empty(out_shape, grad_out.options());
  if (m_rows == 0 || k == 0) return dx;
  if (n == 0) return dx.zero_();
  const at::Tensor g = grad_out.reshape({m_rows, n}).contiguous(), mw = mask_words.contiguous();
  const Isa isa = active_isa();
  // AVX-512: 16 accumulators of 2 (or 4) rows x 2 (1) words x 2 planes x 2 halves; AVX2: 1 row
  // (8 of 16 ymm)
  const int64_t pass_rows = isa == kAvx512 ? (m_rows <= 2 ? 2 : 4) : isa == kAvx2 ? 1 : 4;
  thread_local Scratch scratch;
  const size_t col_bytes = align64(nw * sizeof(uint32_t));
  const size_t row_bytes = align64((n + 16) * sizeof(uint32_t));
  const size_t gs_bytes = static_cast<size_t>(std::min(m_rows, pass_rows) * n) * sizeof(float);
  char* base = scratch.get(col_bytes + row_bytes + gs_bytes);
  uint32_t* col = reinterpret_cast<uint32_t*>(base);
  uint32_t* rowh = reinterpret_cast<uint32_t*>(base + col_bytes);
  float* gs = reinterpret_cast<float*>(base + col_bytes + row_bytes);
  const Seed s = make_seed(format_version, seed, layer, k, nw, col);
  if (format_version == 2)
    for (int64_t i = 0; i < n; ++i) rowh[i] = supsup_seed::v2_row(s.keys, static_cast<uint32_t>(i));
  const float c = static_cast<float>(scale);
  const float* gp = g.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  for (int64_t m0 = 0; m0 < m_rows; m0 += pass_rows) {
    const int64_t mb = std::min(pass_rows, m_rows - m0);
    for (int64_t i = 0; i < mb * n; ++i) gs[i] = c * gp[m0 * n + i];
    compiler_fence();
    const Backward bw{gs, word_ptr(mw), rowh, dxp + m0 * k, n, nw, k, mb, s};
    switch (mb) {
      case 1:
        grad_pass_mb<1>(bw, isa);
        break;
      case 2:
        grad_pass_mb<2>(bw, isa);
        break;
      case 3:
        grad_pass_mb<3>(bw, isa);
        break;
      default:
        grad_pass_mb<4>(bw, isa);
        break;
    }
  }
  grad_nonfinite_rows(gp, m_rows, n, word_ptr(mw), k, nw, s, c, dxp);
  return dx;
}

void seeded_fill_(const at::Tensor& out, int64_t seed, int64_t layer, double scale, int64_t format_version) {
  const char* op = "seeded_fill_";
  check_version(format_version, op);
  if (format_version == 1) return signed_constant_fill_(out, seed, layer, scale);
  check_float(out, op, "out");
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(out.dim() >= 2, op, ": out must have at least 2 dims [N, ...], got shape ", out.sizes());
  const int64_t n = out.size(0), k = n ? out.numel() / n : 0;
  check_size_limits(n, k, op);
  const int64_t nw = words_per_row(k);
  const V2Keys keys = supsup_seed::v2_keys(seed, layer);
  const float c = static_cast<float>(scale);  // built in float32 first, as the reference does
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "seeded_fill_", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t pos = static_cast<scalar_t>(c), neg = static_cast<scalar_t>(-c);
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t row = n0; row < n1; ++row) {
        const uint32_t rh = supsup_seed::v2_row(keys, static_cast<uint32_t>(row));
        scalar_t* d = dst + row * k;
        for (int64_t j = 0; j < nw; ++j) {
          const uint32_t w = supsup_seed::v2_sign_word(rh, supsup_seed::v2_column(keys, static_cast<uint32_t>(j)));
          const int nb = bits_in_word(j, k);
          for (int i = 0; i < nb; ++i) d[j * kWordBits + i] = ((w >> i) & 1u) ? pos : neg;
        }
      }
    });
  });
}

at::Tensor seed_sign_words(int64_t n, int64_t k, int64_t seed, int64_t layer, int64_t format_version) {
  const char* op = "seed_sign_words";
  check_version(format_version, op);
  TORCH_CHECK(n >= 0 && k >= 0, op, ": n and k must be >= 0, got n=", n, ", k=", k);
  check_size_limits(n, k, op);
  const int64_t nw = words_per_row(k);
  at::Tensor out = at::empty({n, nw}, at::TensorOptions().dtype(at::kInt));
  std::vector<uint32_t> col(static_cast<size_t>(nw));
  const Seed s = make_seed(format_version, seed, layer, k, nw, col.data());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(nw, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t row = n0; row < n1; ++row)
      for (int64_t j = 0; j < nw; ++j) {
        const int nb = bits_in_word(j, k);
        const uint32_t keep = nb >= 32 ? 0xFFFFFFFFu : (1u << nb) - 1u;
        dst[row * nw + j] = sign_word(s, row, j) & keep;
      }
  });
  return out;
}

std::string ternary_isa() {
  return isa_name(active_isa());
}

void set_ternary_isa(const std::string& name) {
  int isa = -1;
  if (name == "auto") isa = kAuto;
  if (name == "scalar") isa = kScalar;
  if (name == "avx2") {
    TORCH_CHECK(SUPSUP_AVX2, "set_ternary_isa: this build has no AVX2 kernels");
    isa = kAvx2;
  }
  if (name == "avx512") {
    TORCH_CHECK(SUPSUP_TERNARY_AVX512 && cpu_has_avx512(), "set_ternary_isa: AVX-512F is not available here");
    isa = kAvx512;
  }
  TORCH_CHECK(isa >= 0, "set_ternary_isa: expected auto, avx512, avx2 or scalar, got '", name, "'");
  g_isa.store(isa, std::memory_order_relaxed);
}

}  // namespace supsup
