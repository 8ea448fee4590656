// Element access shared by the kernels: typed loads and stores through fp32, dtype dispatch.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "supsup_cuda.cuh"

// `#pragma unroll` where nvcc compiles device code; nothing in host builds (gcc would warn)
#ifdef __CUDA_ARCH__
#define SUPSUP_UNROLL _Pragma("unroll")
#else
#define SUPSUP_UNROLL
#endif

namespace supsup_cuda {
namespace detail {

template <typename T>
__host__ __device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__host__ __device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__host__ __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// "non-zero" as torch's `mask != 0`: -0.0 is zero, NaN is not.
template <typename T>
__host__ __device__ __forceinline__ bool nonzero(T v) {
  return v != T(0);
}
template <>
__host__ __device__ __forceinline__ bool nonzero<__half>(__half v) {
  return (__half_as_ushort(v) & 0x7FFFu) != 0;
}
template <>
__host__ __device__ __forceinline__ bool nonzero<__nv_bfloat16>(__nv_bfloat16 v) {
  return (__bfloat16_as_ushort(v) & 0x7FFFu) != 0;
}

// Read-only loads through the non-coherent cache on the device; plain loads on the host (the
// host builds of the per-thread functions in the tests).
__host__ __device__ __forceinline__ uint32_t load_word(const int32_t* p) {
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__ldg(p));
#else
  return static_cast<uint32_t>(*p);
#endif
}

__host__ __device__ __forceinline__ int4 load_words4(const int32_t* p) {  // p 16-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const int4*>(p));
#else
  return *reinterpret_cast<const int4*>(p);
#endif
}

// Another block's results, read past L1 (which is not coherent between SMs).
__host__ __device__ __forceinline__ float4 load_cg(const float4* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}

inline unsigned grid_for(int64_t n, int threads, int64_t cap = 1 << 20) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace detail

// Calls `f(T{})` with T the C++ type of `dtype` among the floating types; false if not floating.
template <typename F>
bool dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF16:
      f(__half{});
      return true;
    case DType::kBF16:
      f(__nv_bfloat16{});
      return true;
    case DType::kF32:
      f(float{});
      return true;
    case DType::kF64:
      f(double{});
      return true;
    default:
      return false;
  }
}

// Same over every supported element type.
template <typename F>
bool dispatch_any(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kU8:
      f(uint8_t{});
      return true;
    case DType::kI8:
      f(int8_t{});
      return true;
    case DType::kI16:
      f(int16_t{});
      return true;
    case DType::kI32:
      f(int32_t{});
      return true;
    case DType::kI64:
      f(int64_t{});
      return true;
    default:
      return dispatch_float(dtype, f);
  }
}

}  // namespace supsup_cuda
