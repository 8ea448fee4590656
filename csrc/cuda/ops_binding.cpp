// CUDA implementations of the supsup_fast_C ops (schemas: csrc/ops.cpp), adapting tensors
// to the torch-free launchers of supsup_cuda.cuh. Ops not registered here have no CUDA kernel
// in the extension; the Python backend registry sends them to Triton or the reference path.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "supsup_cuda.cuh"

namespace {

using supsup_cuda::DType;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kFloat:
      return DType::kF32;
    case at::kDouble:
      return DType::kF64;
    case at::kBool:
    case at::kByte:
      return DType::kU8;
    case at::kChar:
      return DType::kI8;
    case at::kShort:
      return DType::kI16;
    case at::kInt:
      return DType::kI32;
    case at::kLong:
      return DType::kI64;
    default:
      TORCH_CHECK(false, "supsup_fast (cuda): unsupported dtype ", t);
  }
}

bool is_gpu_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "supsup_fast (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

void check_words(const at::Tensor& words, const char* name) {
  TORCH_CHECK(words.is_cuda() && words.scalar_type() == at::kInt, name, " must be int32 CUDA words");
}

int64_t wpr_of(int64_t k) {
  return (k + 31) / 32;
}

at::Tensor pack_masks(const at::Tensor& masks) {
  TORCH_CHECK(masks.is_cuda() && masks.dim() >= 2, "pack_masks: masks must be a CUDA tensor [..., N, K]");
  c10::cuda::CUDAGuard guard(masks.device());
  at::Tensor m = masks.contiguous();
  const int64_t k = m.size(-1);
  auto shape = m.sizes().vec();
  shape.back() = wpr_of(k);
  at::Tensor words = at::empty(shape, m.options().dtype(at::kInt));
  if (k == 0 || m.numel() == 0) return words;
  const int64_t rows = m.numel() / k;
  check(supsup_cuda::pack_masks(m.data_ptr(), dtype_of(m.scalar_type()), words.data_ptr<int32_t>(), rows, k,
                                at::cuda::getCurrentCUDAStream()),
        "pack_masks");
  return words;
}

at::Tensor unpack_masks(const at::Tensor& words, int64_t k, at::ScalarType dtype) {
  check_words(words, "unpack_masks: words");
  TORCH_CHECK(words.dim() >= 2 && words.size(-1) == wpr_of(k), "unpack_masks: words do not hold k=", k, " bits");
  c10::cuda::CUDAGuard guard(words.device());
  at::Tensor w = words.contiguous();
  auto shape = w.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, w.options().dtype(dtype));
  const int64_t rows = w.size(-1) ? w.numel() / w.size(-1) : 0;
  check(supsup_cuda::unpack_masks(w.data_ptr<int32_t>(), out.data_ptr(), dtype_of(dtype), rows, k,
                                  at::cuda::getCurrentCUDAStream()),
        "unpack_masks");
  return out;
}

at::Tensor superpose(const at::Tensor& weight, const at::Tensor& bank, const at::Tensor& alpha) {
  TORCH_CHECK(weight.is_cuda() && is_gpu_float(weight.scalar_type()), "superpose: weight must be fp16/bf16/fp32 CUDA");
  check_words(bank, "superpose: bank");
  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0);
  const int64_t k = n ? w.numel() / n : 0;
  TORCH_CHECK(bank.dim() == 3 && bank.size(1) == n && bank.size(2) == wpr_of(k), "superpose: bank shape mismatch");
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == bank.size(0), "superpose: alpha must be [T]");
  at::Tensor a = alpha.to(w.device(), at::kFloat).contiguous();
  at::Tensor b = bank.contiguous();
  at::Tensor out = at::empty_like(w);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool aligned = reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0;
  const supsup_cuda::SuperposePlan plan = supsup_cuda::superpose_plan(n, k, b.size(0), sms, aligned);
  // per call from the caching allocator: stream-ordered, and captured with the call in a CUDA graph
  at::Tensor ws = at::empty({plan.ws_floats}, w.options().dtype(at::kFloat));
  at::Tensor counters = at::zeros({plan.counters}, w.options().dtype(at::kInt));
  check(
      supsup_cuda::superpose(w.data_ptr(), dtype_of(w.scalar_type()), b.data_ptr<int32_t>(), a.data_ptr<float>(),
                             out.data_ptr(), n, k, b.size(0), plan, plan.ws_floats ? ws.data_ptr<float>() : nullptr,
                             plan.counters ? counters.data_ptr<int32_t>() : nullptr, at::cuda::getCurrentCUDAStream()),
      "superpose");
  return out;
}

at::Tensor mask_dots(const at::Tensor& v, const at::Tensor& bank) {
  TORCH_CHECK(v.is_cuda() && is_gpu_float(v.scalar_type()) && (v.dim() == 2 || v.dim() == 3),
              "mask_dots: v must be fp16/bf16/fp32 CUDA [N, K] or [R, N, K]");
  check_words(bank, "mask_dots: bank");
  c10::cuda::CUDAGuard guard(v.device());
  const bool squeeze = v.dim() == 2;
  at::Tensor vv = (squeeze ? v.unsqueeze(0) : v).contiguous();
  const int64_t r = vv.size(0), n = vv.size(1), k = vv.size(2);
  TORCH_CHECK(bank.dim() == 3 && bank.size(1) == n && bank.size(2) == wpr_of(k), "mask_dots: bank shape mismatch");
  at::Tensor b = bank.contiguous();
  at::Tensor out = at::zeros({r, b.size(0)}, vv.options().dtype(at::kFloat));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check(supsup_cuda::mask_dots(vv.data_ptr(), dtype_of(vv.scalar_type()), b.data_ptr<int32_t>(), out.data_ptr<float>(),
                               r, n, k, b.size(0), sms, at::cuda::getCurrentCUDAStream()),
        "mask_dots");
  out = out.to(v.scalar_type());
  return squeeze ? out.squeeze(0) : out;
}

// `out` is written through its data pointer; the C++ signature matches the CPU kernel's
void signed_constant_fill_(const at::Tensor& out, int64_t seed, int64_t layer, double scale) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.is_floating_point(),
              "signed_constant_fill_: out must be a contiguous floating CUDA tensor");
  c10::cuda::CUDAGuard guard(out.device());
  check(supsup_cuda::signed_constant_fill(out.data_ptr(), dtype_of(out.scalar_type()), out.numel(),
                                          supsup_cuda::layer_key(seed, layer), static_cast<float>(scale),
                                          at::cuda::getCurrentCUDAStream()),
        "signed_constant_fill_");
}

at::Tensor masked_linear_seeded(const at::Tensor& x, const at::Tensor& mask_words, int64_t seed, int64_t layer,
                                double scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && is_gpu_float(x.scalar_type()), "masked_linear_seeded: x must be fp16/bf16/fp32 CUDA");
  check_words(mask_words, "masked_linear_seeded: mask_words");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t n = mask_words.size(0);
  TORCH_CHECK(mask_words.dim() == 2 && mask_words.size(1) == wpr_of(k), "masked_linear_seeded: words shape mismatch");
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  if (m > supsup_cuda::kSeededGemvMaxM) {
    // many rows: regenerate W once, mask it, and let cuBLAS run the GEMM
    at::Tensor w = at::empty({n, k}, x2.options());
    signed_constant_fill_(w, seed, layer, scale);
    w.mul_(unpack_masks(mask_words, k, x2.scalar_type()));
    return at::linear(x2, w, bias).reshape(out_shape);
  }
  at::Tensor words = mask_words.contiguous();
  at::Tensor y = at::empty({m, n}, x2.options());
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(x2.scalar_type()).contiguous();
  check(supsup_cuda::masked_linear_seeded_gemv(x2.data_ptr(), dtype_of(x2.scalar_type()), words.data_ptr<int32_t>(),
                                               b ? b->data_ptr() : nullptr, y.data_ptr(), m, n, k,
                                               supsup_cuda::layer_key(seed, layer), static_cast<float>(scale),
                                               at::cuda::getCurrentCUDAStream()),
        "masked_linear_seeded");
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(supsup_fast_C, CUDA, m) {
  m.impl("pack_masks", &pack_masks);
  m.impl("unpack_masks", &unpack_masks);
  m.impl("superpose", &superpose);
  m.impl("mask_dots", &mask_dots);
  m.impl("signed_constant_fill_", &signed_constant_fill_);
  m.impl("masked_linear_seeded", &masked_linear_seeded);
}
