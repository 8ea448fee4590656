// CUDA kernels of supsup_fast, written against raw pointers and a stream.
//
// No torch headers: every .cu file compiles with plain nvcc (a real compile check on machines
// without a GPU), and csrc/cuda/ops_binding.cpp adapts tensors to these launchers.
//
// Packed format (supsup_fast/format.py): weight (n, k) of an [N, K] view is bit k % 32 of int32
// word [n, k / 32], LSB first; rows are word-aligned (wpr = ceil(K / 32) words per row); padding
// bits are zero; a bank of T tasks is [T, N, wpr], task-major.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../seed_format.h"

namespace supsup_cuda {

// Element types the launchers read and write (bool travels as kU8).
enum class DType : int { kF16 = 0, kBF16, kF32, kF64, kU8, kI8, kI16, kI32, kI64 };

// The seed formats' hash and layer key: seed_format.h, the one transcription of seed_format.py.
using supsup_seed::hash32;
using supsup_seed::layer_key;

// masks [rows, k] (non-zero = kept, any DType) -> words [rows, ceil(k/32)]. One warp ballot per word.
cudaError_t pack_masks(const void* masks, DType dtype, int32_t* words, int64_t rows, int64_t k, cudaStream_t stream);

// words [rows, ceil(k/32)] -> 0/1 values [rows, k] of `dtype`.
cudaError_t unpack_masks(const int32_t* words, void* out, DType dtype, int64_t rows, int64_t k, cudaStream_t stream);

// How superpose splits its work: `chunks` balanced chunks of tasks x `blocks_x` blocks of word
// groups (`vec` words per thread), and the fp32 workspace / int32 counters it needs (zero when
// chunks == 1). The counters must be zero before the launch; the kernel leaves them zero.
struct SuperposePlan {
  int chunks;
  int vec;
  int64_t groups;
  int64_t blocks_x;
  int64_t ws_floats;
  int64_t counters;
};
SuperposePlan superpose_plan(int64_t n, int64_t k, int64_t num_tasks, int num_sms, bool bank_aligned);

// out = W * sum_t alpha_t M_t for W [n, k] (F16/BF16/F32), bank [T, n, wpr], fp32 alpha [T].
// Tasks with alpha_t = 0 are skipped; a chunk of tasks whose non-zero alphas are all equal is
// counted with a carry-save tree into bit-sliced counters (a few integer ops per task per 32
// weights). Deterministic: chunk partials are summed in chunk order.
cudaError_t superpose(const void* weight, DType dtype, const int32_t* bank, const float* alpha, void* out, int64_t n,
                      int64_t k, int64_t num_tasks, const SuperposePlan& plan, float* ws, int32_t* counters,
                      cudaStream_t stream);

// out[r, t] += <v_r, M_t> for v [R, n, k] (F16/BF16/F32), bank [T, n, wpr]; `out` is fp32 [R, T],
// zeroed by the caller. "Four Russians": 256-entry partial-sum tables per byte of weights in
// shared memory, so every task costs one lookup per 8 weights.
cudaError_t mask_dots(const void* v, DType dtype, const int32_t* bank, float* out, int64_t rows_r, int64_t n, int64_t k,
                      int64_t num_tasks, int num_sms, cudaStream_t stream);

// out[i] = (hash32(uint32(i) ^ key) & 1) ? scale : -scale, for i < numel (F16/BF16/F32/F64).
cudaError_t signed_constant_fill(void* out, DType dtype, int64_t numel, uint32_t key, float scale, cudaStream_t stream);

// y [m, n] = x [m, k] (W * M)^T + bias with W the signed constant regenerated from `key`:
// one warp per output feature walks the set mask bits only; no float weight is read.
// m <= kSeededGemvMaxM; x, bias and y share `dtype` (F16/BF16/F32); bias may be null.
constexpr int kSeededGemvMaxM = 8;
cudaError_t masked_linear_seeded_gemv(const void* x, DType dtype, const int32_t* words, const void* bias, void* y,
                                      int64_t m, int64_t n, int64_t k, uint32_t key, float scale, cudaStream_t stream);

}  // namespace supsup_cuda
