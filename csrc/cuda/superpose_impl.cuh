// The per-thread work of superpose (out = W * sum_t alpha_t M_t), as host-and-device functions:
// superpose.cu runs them in a kernel; tests/test_cuda_sources.py runs them on the host, thread
// by thread and chunk by chunk, against a float64 reference.
//
// Decomposition: thread `group` owns kVec consecutive words of the bank's [n, wpr] slab (one
// 16-byte load per task when the slab allows it) and chunk `chunk` of the tasks (balanced: chunk c
// is [c T / C, (c + 1) T / C)). It loads kUnroll tasks' words before it uses any of them. When every
// non-zero alpha of the chunk is equal (alpha = 1/T in one-shot task inference) the words go
// through a Harley-Seal carry-save tree into bit-sliced counters (2 LOP3 per carry-save add, ~3.5
// instructions per word and task) and are unsliced once per chunk; otherwise each task adds its
// alpha to the set bits. A chunk's fp32 partial sums go to the workspace (float4 index f of the
// thread at ws4[(chunk * kVec * 8 + f) * groups + group]: a warp's stores are contiguous), or,
// with one chunk, straight to the epilogue; the epilogue (W * sum, cast) writes 16-byte vectors.
#pragma once

#include <cstdint>

#include "elem.cuh"

namespace supsup_cuda {
namespace sup {

constexpr int kUnroll = 8;      // tasks whose words are in flight together
constexpr int kMaxChunk = 511;  // tasks per chunk: counts fit in 9 bit-slices
constexpr int kHiSlices = 6;    // count bits 3..8 (bits 0..2 are the carry-save tree's)

struct Shape {
  int64_t n, k, wpr, slab, groups, num_tasks;
  int chunks;
  bool vec_epilogue;  // weight/out 16-byte aligned and k % 8 == 0
};

__host__ __device__ inline int64_t chunk_begin(const Shape& s, int chunk) {
  return (s.num_tasks * chunk) / s.chunks;
}

// Carry-save add: (hi, lo) = a + b + c per bit (2 three-input LUT ops on sm_90).
__host__ __device__ __forceinline__ void csa(uint32_t& hi, uint32_t& lo, uint32_t a, uint32_t b, uint32_t c) {
  const uint32_t u = a ^ b;
  hi = (a & b) | (u & c);
  lo = u ^ c;
}

template <int kVec>
__host__ __device__ __forceinline__ void load_group(const int32_t* slab, int64_t word0, int64_t n_words,
                                                    uint32_t (&w)[kVec]) {
  if (kVec == 4 && word0 + 4 <= n_words) {
    const int4 v = detail::load_words4(slab + word0);
    w[0] = static_cast<uint32_t>(v.x);
    w[kVec > 1 ? 1 : 0] = static_cast<uint32_t>(v.y);
    w[kVec > 2 ? 2 : 0] = static_cast<uint32_t>(v.z);
    w[kVec > 3 ? 3 : 0] = static_cast<uint32_t>(v.w);
  } else {
    SUPSUP_UNROLL
    for (int j = 0; j < kVec; ++j) w[j] = word0 + j < n_words ? detail::load_word(slab + word0 + j) : 0u;
  }
}

// Whether every non-zero alpha of the chunk equals the first non-zero one (returned in `ref`).
__host__ __device__ inline bool uniform_alpha(const float* a, int count, float& ref) {
  ref = 0.f;
  for (int i = 0; i < count; ++i) {
    if (a[i] != 0.f) {
      ref = a[i];
      break;
    }
  }
  for (int i = 0; i < count; ++i) {
    if (a[i] != 0.f && a[i] != ref) return false;
  }
  return true;
}

// Epilogue for 8 weights (octet o of word j of the group): out = W * sum, cast to T.
template <typename T>
__host__ __device__ inline void store_octet(const T* weight, T* out, const Shape& s, int64_t word, int o,
                                            const float (&sum)[8]) {
  if (word >= s.slab) return;
  const int64_t row = word / s.wpr;
  const int64_t col = (word - row * s.wpr) * 32 + o * 8;
  if (col >= s.k) return;
  const int64_t base = row * s.k + col;
  if (s.vec_epilogue && col + 8 <= s.k) {
    // 16-byte vectors: 8 halves in one, 8 floats in two
    alignas(16) T w[8];
    alignas(16) T y[8];
    if (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(w) = *reinterpret_cast<const uint4*>(weight + base);
    } else {
      reinterpret_cast<uint4*>(w)[0] = reinterpret_cast<const uint4*>(weight + base)[0];
      reinterpret_cast<uint4*>(w)[1] = reinterpret_cast<const uint4*>(weight + base)[1];
    }
    SUPSUP_UNROLL
    for (int e = 0; e < 8; ++e) y[e] = detail::from_float<T>(detail::to_float(w[e]) * sum[e]);
    if (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(out + base) = *reinterpret_cast<const uint4*>(y);
    } else {
      reinterpret_cast<uint4*>(out + base)[0] = reinterpret_cast<const uint4*>(y)[0];
      reinterpret_cast<uint4*>(out + base)[1] = reinterpret_cast<const uint4*>(y)[1];
    }
    return;
  }
  for (int e = 0; e < 8 && col + e < s.k; ++e) {
    out[base + e] = detail::from_float<T>(detail::to_float(weight[base + e]) * sum[e]);
  }
}

// Partial sums of one chunk for one thread's kVec words: into `part` [kVec * 32].
template <int kVec>
__host__ __device__ inline void chunk_partial(const int32_t* bank, const Shape& s, int64_t group, int chunk,
                                              const float* s_alpha, float (&part)[kVec * 32]) {
  const int64_t t0 = chunk_begin(s, chunk);
  const int count = static_cast<int>(chunk_begin(s, chunk + 1) - t0);
  const int64_t word0 = group * kVec;
  float ref;
  if (uniform_alpha(s_alpha, count, ref)) {
    uint32_t ones[kVec], twos[kVec], fours[kVec], hi[kVec][kHiSlices];
    SUPSUP_UNROLL
    for (int j = 0; j < kVec; ++j) {
      ones[j] = twos[j] = fours[j] = 0u;
      SUPSUP_UNROLL
      for (int l = 0; l < kHiSlices; ++l) hi[j][l] = 0u;
    }
    if (ref != 0.f) {
      for (int i = 0; i < count; i += kUnroll) {
        uint32_t d[kUnroll][kVec];
        SUPSUP_UNROLL
        for (int u = 0; u < kUnroll; ++u) {  // every load issued before the first add
          const int t = i + u;
          if (t < count && s_alpha[t] != 0.f) {
            load_group<kVec>(bank + (t0 + t) * s.slab, word0, s.slab, d[u]);
          } else {
            SUPSUP_UNROLL
            for (int j = 0; j < kVec; ++j) d[u][j] = 0u;
          }
        }
        SUPSUP_UNROLL
        for (int j = 0; j < kVec; ++j) {
          uint32_t twos_a, twos_b, fours_a, fours_b, eights;
          csa(twos_a, ones[j], ones[j], d[0][j], d[1][j]);
          csa(twos_b, ones[j], ones[j], d[2][j], d[3][j]);
          csa(fours_a, twos[j], twos[j], twos_a, twos_b);
          csa(twos_a, ones[j], ones[j], d[4][j], d[5][j]);
          csa(twos_b, ones[j], ones[j], d[6][j], d[7][j]);
          csa(fours_b, twos[j], twos[j], twos_a, twos_b);
          csa(eights, fours[j], fours[j], fours_a, fours_b);
          SUPSUP_UNROLL
          for (int l = 0; l < kHiSlices; ++l) {  // ripple the eights into count bits 3..8
            const uint32_t carry = hi[j][l] & eights;
            hi[j][l] ^= eights;
            eights = carry;
          }
        }
      }
    }
    SUPSUP_UNROLL
    for (int j = 0; j < kVec; ++j) {
      SUPSUP_UNROLL
      for (int b = 0; b < 32; ++b) {
        uint32_t cnt = ((ones[j] >> b) & 1u) | (((twos[j] >> b) & 1u) << 1) | (((fours[j] >> b) & 1u) << 2);
        SUPSUP_UNROLL
        for (int l = 0; l < kHiSlices; ++l) cnt |= ((hi[j][l] >> b) & 1u) << (3 + l);
        part[j * 32 + b] = ref * static_cast<float>(cnt);
      }
    }
    return;
  }
  // different alphas: each word's 32 sums in turn (its 16-byte line stays in L1 between words)
  SUPSUP_UNROLL
  for (int j = 0; j < kVec; ++j) {
    float acc[32];
    SUPSUP_UNROLL
    for (int b = 0; b < 32; ++b) acc[b] = 0.f;
    if (word0 + j < s.slab) {
      for (int t = 0; t < count; ++t) {
        const float a = s_alpha[t];
        if (a == 0.f) continue;
        const uint32_t w = detail::load_word(bank + (t0 + t) * s.slab + word0 + j);
        SUPSUP_UNROLL
        for (int b = 0; b < 32; ++b) acc[b] += ((w >> b) & 1u) ? a : 0.f;
      }
    }
    SUPSUP_UNROLL
    for (int b = 0; b < 32; ++b) part[j * 32 + b] = acc[b];
  }
}

template <int kVec>
__host__ __device__ inline float4* ws_slot(float* ws, const Shape& s, int chunk, int f, int64_t group) {
  return reinterpret_cast<float4*>(ws) + (static_cast<int64_t>(chunk) * (kVec * 8) + f) * s.groups + group;
}

// One chunk for one thread: the partial sums to the workspace, or (one chunk) to the output.
template <typename T, int kVec>
__host__ __device__ inline void chunk_thread(const T* weight, const int32_t* bank, float* ws, T* out, const Shape& s,
                                             int64_t group, int chunk, const float* s_alpha) {
  float part[kVec * 32];
  chunk_partial<kVec>(bank, s, group, chunk, s_alpha, part);
  const int64_t word0 = group * kVec;
  if (s.chunks == 1) {
    SUPSUP_UNROLL
    for (int j = 0; j < kVec; ++j) {
      SUPSUP_UNROLL
      for (int o = 0; o < 4; ++o) {
        float sum[8];
        SUPSUP_UNROLL
        for (int e = 0; e < 8; ++e) sum[e] = part[j * 32 + o * 8 + e];
        store_octet<T>(weight, out, s, word0 + j, o, sum);
      }
    }
    return;
  }
  SUPSUP_UNROLL
  for (int f = 0; f < kVec * 8; ++f) {
    *ws_slot<kVec>(ws, s, chunk, f, group) =
        make_float4(part[4 * f], part[4 * f + 1], part[4 * f + 2], part[4 * f + 3]);
  }
}

// The last chunk's thread: sum the chunks' partials in chunk order (the same bits whichever
// chunk finished last) and write the output.
template <typename T, int kVec>
__host__ __device__ inline void finish_thread(const T* weight, const float* ws, T* out, const Shape& s, int64_t group) {
  const int64_t word0 = group * kVec;
  SUPSUP_UNROLL
  for (int j = 0; j < kVec; ++j) {
    SUPSUP_UNROLL
    for (int o = 0; o < 4; ++o) {
      float sum[8];
      SUPSUP_UNROLL
      for (int e = 0; e < 8; ++e) sum[e] = 0.f;
      for (int c = 0; c < s.chunks; ++c) {
        SUPSUP_UNROLL
        for (int h = 0; h < 2; ++h) {
          const float4 p = detail::load_cg(ws_slot<kVec>(const_cast<float*>(ws), s, c, j * 8 + o * 2 + h, group));
          sum[4 * h] += p.x;
          sum[4 * h + 1] += p.y;
          sum[4 * h + 2] += p.z;
          sum[4 * h + 3] += p.w;
        }
      }
      store_octet<T>(weight, out, s, word0 + j, o, sum);
    }
  }
}

}  // namespace sup
}  // namespace supsup_cuda
