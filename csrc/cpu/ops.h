// The CPU kernels of the supsup_fast_C ops (registered in register.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace supsup {

at::Tensor pack_masks(const at::Tensor& masks);
at::Tensor unpack_masks(const at::Tensor& words, int64_t k, at::ScalarType dtype);
at::Tensor apply_mask(const at::Tensor& weight, const at::Tensor& mask_words);
// W * M written into `out` (contiguous, weight's shape and dtype; checks are the caller's)
void apply_mask_into(const at::Tensor& weight, const at::Tensor& mask_words, const at::Tensor& out);
void signed_constant_fill_(const at::Tensor& out, int64_t seed, int64_t layer, double scale);

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_words,
                         const std::optional<at::Tensor>& bias);
at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& mask_words);
at::Tensor masked_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight);
// (dL/dy^T x) * W * sign(scores): the top-k binariser's score gradient in one epilogue
at::Tensor masked_weight_grad_sign(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& scores);
at::Tensor masked_linear_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bank,
                                 const at::Tensor& task_ids, const std::optional<at::Tensor>& bias);
at::Tensor masked_linear_seeded(const at::Tensor& x, const at::Tensor& mask_words, int64_t seed, int64_t layer,
                                double scale, const std::optional<at::Tensor>& bias);

// the top-k binariser's selection: bool mask of the k largest entries (of |a| with `magnitude`)
// of a flat float32 tensor
at::Tensor largest_k(const at::Tensor& a, int64_t k, bool magnitude);
// the binarisers' masks packed straight from [N, K] float32 scores: [S >= 0], and top-k of |S|
at::Tensor threshold_words(const at::Tensor& scores);
at::Tensor topk_words(const at::Tensor& scores, int64_t k);

// ternary kernels over a seed-regenerated signed constant (ternary.cpp; supsup_fast/ternary.py)
at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& mask_words, int64_t seed, int64_t layer, double scale,
                          const std::optional<at::Tensor>& bias, int64_t format_version);
at::Tensor ternary_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& mask_words, int64_t k, int64_t seed,
                                     int64_t layer, double scale, int64_t format_version);
// +-scale in seed format `format_version` (supsup_fast/seed_format.py) over out's [N, K] view
void seeded_fill_(const at::Tensor& out, int64_t seed, int64_t layer, double scale, int64_t format_version);
// the signs of an [n, k] weight packed like a mask (int32 [n, ceil(k/32)], zero padding)
at::Tensor seed_sign_words(int64_t n, int64_t k, int64_t seed, int64_t layer, int64_t format_version);
// which ternary kernel runs ("avx512", "avx2", "scalar"), and a switch to force one for tests
std::string ternary_isa();
void set_ternary_isa(const std::string& name);

at::Tensor superpose(const at::Tensor& weight, const at::Tensor& bank, const at::Tensor& alpha);
at::Tensor mask_dots(const at::Tensor& v, const at::Tensor& bank);

}  // namespace supsup
