// masked_linear with a signed-constant weight regenerated from its hash: a GEMV for few rows.
//
// W[n, k] = +-scale with sign hash32(uint32(n*K + k) ^ key) & 1, so W * M is ternary and needs no
// weight memory at all: the only bytes read are the mask bits (N K / 8) and x.
#include "elem.cuh"

namespace supsup_cuda {
namespace {

constexpr int kWarps = 8;

// One warp per output feature n. Lane l takes words l, l + 32, ... of row n and visits only the
// set bits (about half of them), adding +-x[m, k] for every row m; a warp reduction finishes.
template <typename T, int MaxM>
__global__ void __launch_bounds__(kWarps * 32)
    seeded_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ words, const T* __restrict__ bias,
                       T* __restrict__ y, int m, int64_t n, int64_t k, uint32_t key, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n) return;  // whole warps leave together
  const int64_t wpr = (k + 31) / 32;
  const uint32_t row_base = static_cast<uint32_t>(row) * static_cast<uint32_t>(k);  // index mod 2**32
  float acc[MaxM];
#pragma unroll
  for (int i = 0; i < MaxM; ++i) acc[i] = 0.f;

  for (int64_t w = lane; w < wpr; w += 32) {
    uint32_t bits = static_cast<uint32_t>(__ldg(words + row * wpr + w));
    while (bits) {
      const int b = __ffs(bits) - 1;
      bits &= bits - 1;
      const int64_t col = w * 32 + b;
      const bool pos = hash32((row_base + static_cast<uint32_t>(col)) ^ key) & 1u;
#pragma unroll
      for (int i = 0; i < MaxM; ++i) {
        if (i < m) {
          const float v = detail::to_float(x[i * k + col]);
          acc[i] += pos ? v : -v;
        }
      }
    }
  }
  // the weight value is scale rounded to T, exactly as the reference regenerates it
  const float wscale = detail::to_float(detail::from_float<T>(scale));
  const float b = bias != nullptr ? detail::to_float(bias[row]) : 0.f;
#pragma unroll
  for (int i = 0; i < MaxM; ++i) {
    float s = acc[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
    if (lane == 0 && i < m) y[i * n + row] = detail::from_float<T>(s * wscale + b);
  }
}

template <typename T>
void launch_seeded(const void* x, const int32_t* words, const void* bias, void* y, int m, int64_t n, int64_t k,
                   uint32_t key, float scale, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  T* yp = static_cast<T*>(y);
  // fewer accumulators for the single-row (decode) case
  if (m == 1) {
    seeded_gemv_kernel<T, 1><<<grid, kWarps * 32, 0, stream>>>(xp, words, bp, yp, m, n, k, key, scale);
  } else if (m <= 4) {
    seeded_gemv_kernel<T, 4><<<grid, kWarps * 32, 0, stream>>>(xp, words, bp, yp, m, n, k, key, scale);
  } else {
    seeded_gemv_kernel<T, kSeededGemvMaxM><<<grid, kWarps * 32, 0, stream>>>(xp, words, bp, yp, m, n, k, key, scale);
  }
}

}  // namespace

cudaError_t masked_linear_seeded_gemv(const void* x, DType dtype, const int32_t* words, const void* bias, void* y,
                                      int64_t m, int64_t n, int64_t k, uint32_t key, float scale, cudaStream_t stream) {
  if (m < 0 || m > kSeededGemvMaxM) return cudaErrorInvalidValue;
  if (m == 0 || n == 0) return cudaSuccess;
  const int mm = static_cast<int>(m);
  switch (dtype) {
    case DType::kF16:
      launch_seeded<__half>(x, words, bias, y, mm, n, k, key, scale, stream);
      break;
    case DType::kBF16:
      launch_seeded<__nv_bfloat16>(x, words, bias, y, mm, n, k, key, scale, stream);
      break;
    case DType::kF32:
      launch_seeded<float>(x, words, bias, y, mm, n, k, key, scale, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace supsup_cuda
