// The per-thread pieces of mask_dots (<v_r, M_t> for all rows r and tasks t), as host-and-device
// functions: mask_dots.cu composes them in a kernel; tests/test_cuda_sources.py runs them on the
// host, thread by thread, against the reference.
//
// "Four Russians": per step of 8 words (256 weights) a block builds 32 tables of the 256 partial
// sums of v over each byte (8 weights) of the step; a task then costs one lookup per byte of its
// mask bits. Lane pair (2 s, 2 s + 1) of a 256-thread block takes tasks s + 128 i; each lane owns
// 4 consecutive words of the step (one 16-byte load when the slab allows it).
#pragma once

#include <cstdint>

#include "elem.cuh"

namespace supsup_cuda {
namespace dots {

constexpr int kDotThreads = 256;
constexpr int kStepWords = 8;                               // words per step: 256 weights, 32 byte-groups
constexpr int kGroups = kStepWords * 4;                     // byte groups (8 weights each) per step
constexpr int kLaneWords = 4;                               // words per lane: one 16-byte load
constexpr int kLanesPerTask = kStepWords / kLaneWords;      // 2 lanes share one task in a step
constexpr int kTasksPerPass = kDotThreads / kLanesPerTask;  // 128 tasks per pass
constexpr int kPassUnroll = 2;                              // passes whose words are loaded before any lookup
constexpr int kMaxTasksPerBlock = 2048;                     // shared per-task accumulators (8 KiB)
constexpr int kTabStride = 256 + 8;                         // padding: a warp's 4 groups write distinct banks
constexpr int kBlocksPerSm = 5;                             // 42 KiB of shared memory each

__host__ __device__ constexpr int lowest_bit(int e) {
  return (e & 1) ? 0 : (e & 2) ? 1 : (e & 4) ? 2 : (e & 8) ? 3 : 4;
}

// Thread `tid`'s share of the step's tables: group g = tid / 8 (byte g % 4 of word g / 4),
// entries part + 8 i for part = tid % 8. An entry's low 3 bits are the thread's `part` (one
// partial sum), its high 5 bits the unrolled i (a 32-entry table over weights 3..7 built with
// one add per entry), so every index is a constant.
template <typename T>
__host__ __device__ inline void build_entries(const T* vr, int64_t k, int64_t wpr, int64_t slab, int64_t word0, int tid,
                                              float (*s_tab)[kTabStride]) {
  const int g = tid / 8;
  const int part = tid % 8;
  const int64_t word = word0 + g / 4;
  float x[8];
  SUPSUP_UNROLL
  for (int i = 0; i < 8; ++i) x[i] = 0.f;
  if (word < slab) {
    const int64_t row = word / wpr;
    const int64_t col0 = (word - row * wpr) * 32 + (g % 4) * 8;
    SUPSUP_UNROLL
    for (int i = 0; i < 8; ++i) {
      if (col0 + i < k) x[i] = detail::to_float(vr[row * k + col0 + i]);
    }
  }
  const float base = ((part & 1) ? x[0] : 0.f) + ((part & 2) ? x[1] : 0.f) + ((part & 4) ? x[2] : 0.f);
  float hi[32];
  hi[0] = base;
  SUPSUP_UNROLL
  for (int i = 1; i < 32; ++i) hi[i] = hi[i & (i - 1)] + x[3 + lowest_bit(i)];
  SUPSUP_UNROLL
  for (int i = 0; i < 32; ++i) s_tab[g][part + 8 * i] = hi[i];
}

// A lane's 4 words of task t's step at `word` (zero past the chunk or the slab).
template <bool kVec4>
__host__ __device__ __forceinline__ void load_lane(const int32_t* bank, int64_t slab, int64_t t, int64_t t_end,
                                                   int64_t word, uint32_t (&bits)[kLaneWords]) {
  const int32_t* p = bank + t * slab + word;
  if (kVec4 && t < t_end && word + kLaneWords <= slab) {
    const int4 q = detail::load_words4(p);
    bits[0] = static_cast<uint32_t>(q.x);
    bits[1] = static_cast<uint32_t>(q.y);
    bits[2] = static_cast<uint32_t>(q.z);
    bits[3] = static_cast<uint32_t>(q.w);
  } else {
    SUPSUP_UNROLL
    for (int j = 0; j < kLaneWords; ++j) bits[j] = t < t_end && word + j < slab ? detail::load_word(p + j) : 0u;
  }
}

// The lane's part of <v, M_t> over the step: 16 lookups (4 words x 4 bytes) in its tables.
__host__ __device__ __forceinline__ float lane_sum(float (*s_tab)[kTabStride], const uint32_t (&bits)[kLaneWords],
                                                   int half) {
  float s = 0.f;
  SUPSUP_UNROLL
  for (int j = 0; j < kLaneWords; ++j) {
    const float* tab = s_tab[(kLaneWords * half + j) * 4];
    const uint32_t b = bits[j];
    s += tab[b & 0xFFu] + tab[kTabStride + ((b >> 8) & 0xFFu)] + tab[2 * kTabStride + ((b >> 16) & 0xFFu)] +
         tab[3 * kTabStride + (b >> 24)];
  }
  return s;
}

}  // namespace dots
}  // namespace supsup_cuda
