// The many-row fp32 masked GEMMs, y = x (W * M)^T + b and dL/dx = dL/dy (W * M), with the mask
// applied while W is packed
// (AVX-512F, chosen at run time: the rest of the extension is built for the AVX2 baseline).
#pragma once

#include <cstdint>

namespace supsup {

// Whether masked_gemm_f32 may run: the extension was built for x86-64 by GCC or Clang, the CPU
// and OS support AVX-512F, and it is not switched off (set_avx512_enabled, or the environment
// variable SUPSUP_FAST_NO_AVX512=1 at load).
bool masked_gemm_available();
bool cpu_has_avx512();
void set_avx512_enabled(bool enabled);

// y [m, n] = x [m, k] (W [n, k] * bits)^T + bias [n] (bias may be null). x, w, y contiguous;
// bits is the packed mask [n, ceil(k / 32)]. Parallel through at::parallel_for. Callers check
// masked_gemm_available() first.
void masked_gemm_f32(const float* x, int64_t m, int64_t k, const float* w, const uint32_t* bits, int64_t n,
                     const float* bias, float* y);
// grad_x [m, k] = grad_out [m, n] (W [n, k] * bits): the same kernel, W * M packed by columns.
void masked_gemm_grad_input_f32(const float* grad_out, int64_t m, int64_t n, const float* w, const uint32_t* bits,
                                int64_t k, float* grad_x);

}  // namespace supsup
