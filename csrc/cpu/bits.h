// Shared helpers of the CPU kernels: the packed-mask layout, the signed-constant hash,
// input checks, and AVX2 bit-to-lane expansion.
//
// Layout (supsup_fast/format.py): a weight [N, ...] is viewed as [N, K]; one task's mask is
// uint32 words [N, W], W = ceil(K / 32); weight (n, k) is bit k % 32 of word [n, k / 32],
// least-significant bit first; padding bits past K are zero; a bank is [T, N, W].
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "seed_format.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SUPSUP_AVX2 1
#else
#define SUPSUP_AVX2 0
#endif

namespace supsup {

constexpr int64_t kWordBits = 32;

inline int64_t words_per_row(int64_t k) {
  return (k + kWordBits - 1) / kWordBits;
}

// Accumulation type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// The seed formats' hash and layer key (seed_format.h, the one transcription of seed_format.py).
using supsup_seed::hash32;
using supsup_seed::layer_key;

// Version 1: the signed constant at flat index `idx` is +c when bit 0 of hash32(idx ^ key) is set.
inline bool hash_sign(int64_t idx, uint32_t key) {
  return supsup_seed::v1_sign(static_cast<uint64_t>(idx), key);
}

// ---- input checks (TORCH_CHECK messages name the argument and what is wrong) ----
inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, " must be a floating tensor (fp16/bf16/fp32/fp64), got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// words must be int32 of shape [lead..., n, ceil(k/32)] with `lead` leading dims.
inline void check_words(const at::Tensor& w, int64_t n, int64_t k, int64_t lead, const char* op, const char* name) {
  TORCH_CHECK(w.scalar_type() == at::kInt, op, ": ", name, " must be int32 packed words, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 2 + lead && w.size(lead) == n && w.size(lead + 1) == words_per_row(k), op, ": ", name,
              " has shape ", w.sizes(), ", expected ", (lead ? "[T, " : "["), n, ", ", words_per_row(k),
              "] for a weight with N=", n, ", K=", k);
}

inline const uint32_t* word_ptr(const at::Tensor& w) {
  return reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
}

// Number of valid bits in word `wi` of a row of `k` bits.
inline int bits_in_word(int64_t wi, int64_t k) {
  return static_cast<int>(std::min<int64_t>(kWordBits, k - wi * kWordBits));
}

#if SUPSUP_AVX2
// Lane i of shift_for(q) moves bit 8q+i of a broadcast word into the sign bit, which is all
// that blendv looks at: two instructions turn 8 mask bits into 8 selected float lanes.
inline __m256i shift_for(int q) {
  const int b = 31 - 8 * q;
  return _mm256_setr_epi32(b, b - 1, b - 2, b - 3, b - 4, b - 5, b - 6, b - 7);
}

struct BitLanes {
  __m256i s0, s1, s2, s3;
  BitLanes() : s0(shift_for(0)), s1(shift_for(1)), s2(shift_for(2)), s3(shift_for(3)) {}
  // the 8 lanes of bits 8q..8q+7 of `wv` (a broadcast word), as a blendv selector
  inline __m256 sel(__m256i wv, int q) const {
    const __m256i s = q == 0 ? s0 : q == 1 ? s1 : q == 2 ? s2 : s3;
    return _mm256_castsi256_ps(_mm256_sllv_epi32(wv, s));
  }
};

inline __m256 masked8(__m256 v, __m256 selector) {
  return _mm256_blendv_ps(_mm256_setzero_ps(), v, selector);
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// out[k] = bit(k) ? w[k] : 0 for one row of k values.
template <typename T>
inline void mask_row(const T* w, const uint32_t* words, int64_t k, T* out) {
  const int64_t nw = words_per_row(k);
  for (int64_t wi = 0; wi < nw; ++wi) {
    const uint32_t word = words[wi];
    const int nb = bits_in_word(wi, k);
    const T* src = w + wi * kWordBits;
    T* dst = out + wi * kWordBits;
    for (int i = 0; i < nb; ++i) dst[i] = ((word >> i) & 1u) ? src[i] : T(0);
  }
}

#if SUPSUP_AVX2
template <>
inline void mask_row<float>(const float* w, const uint32_t* words, int64_t k, float* out) {
  const BitLanes L;
  const int64_t full = k / kWordBits;
  for (int64_t wi = 0; wi < full; ++wi) {
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(words[wi]));
    const float* src = w + wi * kWordBits;
    float* dst = out + wi * kWordBits;
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + 8 * q, masked8(_mm256_loadu_ps(src + 8 * q), L.sel(wv, q)));
  }
  if (full * kWordBits < k) {
    const uint32_t word = words[full];
    for (int64_t i = full * kWordBits; i < k; ++i) out[i] = ((word >> (i - full * kWordBits)) & 1u) ? w[i] : 0.f;
  }
}
#endif

}  // namespace supsup
