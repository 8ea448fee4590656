// AVX-512F helpers of the CPU kernels that choose AVX-512 at run time (masked_gemm.cpp, ternary.cpp).
// They carry a target attribute instead of a build flag, so both x86-64 builds (baseline and x86-64-v3)
// contain them; a caller runs them only after checking the CPU (cpu_has_avx512).
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SUPSUP_AVX512_TARGET 1
#define SUPSUP_AVX512_FN __attribute__((target("avx512f")))
#include <immintrin.h>

namespace supsup {

// r[j] lane i <- r[i] lane j: a 16 x 16 transpose of floats (or dwords) held in 16 vectors.
SUPSUP_AVX512_FN inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512d p = _mm512_castps_pd(t[4 * i + h]), q = _mm512_castps_pd(t[4 * i + 2 + h]);
      u[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(p, q));
      u[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(p, q));
    }
  // u[4 g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c
  for (int c = 0; c < 4; ++c) {
    const __m512 ab_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), ab_hi = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44),
                 cd_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
}

}  // namespace supsup

#else
#define SUPSUP_AVX512_TARGET 0
#endif
