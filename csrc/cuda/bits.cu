// Pack / unpack of masks, and the signed-constant fill: exact, bandwidth-bound streams.
#include "elem.cuh"

namespace supsup_cuda {
namespace {

constexpr int kThreads = 256;

// One warp builds one word: lane l reads element 32*w + l of its row (32 contiguous elements per
// warp, coalesced) and a ballot gathers the 32 bits. Grid-stride over words.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ masks, int32_t* __restrict__ words, int64_t rows, int64_t k,
                            int64_t wpr) {
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * wpr;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w < total; w += warps) {
    const int64_t row = w / wpr;
    const int64_t col = (w - row * wpr) * 32 + lane;
    const bool bit = col < k && detail::nonzero(masks[row * k + col]);
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, bit);
    if (lane == 0) words[w] = static_cast<int32_t>(ballot);
  }
}

// One thread per output element: coalesced writes; the word it reads is shared by 32 neighbours.
template <typename T>
__global__ void unpack_kernel(const int32_t* __restrict__ words, T* __restrict__ out, int64_t rows, int64_t k,
                              int64_t wpr) {
  const int64_t total = rows * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / k;
    const int64_t col = i - row * k;
    const uint32_t word = static_cast<uint32_t>(__ldg(words + row * wpr + (col >> 5)));
    out[i] = detail::from_float<T>(static_cast<float>((word >> (col & 31)) & 1u));
  }
}

template <typename T>
__global__ void signed_constant_kernel(T* __restrict__ out, int64_t numel, uint32_t key, float scale) {
  const T pos = detail::from_float<T>(scale);
  const T neg = detail::from_float<T>(-scale);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = (hash32(static_cast<uint32_t>(i) ^ key) & 1u) ? pos : neg;
  }
}

}  // namespace

cudaError_t pack_masks(const void* masks, DType dtype, int32_t* words, int64_t rows, int64_t k, cudaStream_t stream) {
  const int64_t wpr = (k + 31) / 32;
  if (rows * wpr == 0) return cudaSuccess;
  const unsigned grid = detail::grid_for(rows * wpr * 32, kThreads);
  const bool ok = dispatch_any(dtype, [&](auto tag) {
    using T = decltype(tag);
    pack_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(masks), words, rows, k, wpr);
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t unpack_masks(const int32_t* words, void* out, DType dtype, int64_t rows, int64_t k, cudaStream_t stream) {
  if (rows * k == 0) return cudaSuccess;
  const int64_t wpr = (k + 31) / 32;
  const unsigned grid = detail::grid_for(rows * k, kThreads);
  const bool ok = dispatch_any(dtype, [&](auto tag) {
    using T = decltype(tag);
    unpack_kernel<T><<<grid, kThreads, 0, stream>>>(words, static_cast<T*>(out), rows, k, wpr);
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t signed_constant_fill(void* out, DType dtype, int64_t numel, uint32_t key, float scale,
                                 cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const unsigned grid = detail::grid_for(numel, kThreads);
  const bool ok = dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    signed_constant_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(out), numel, key, scale);
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace supsup_cuda
