// CPU kernels of the supsup_fast_C ops (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY_IMPL(supsup_fast_C, CPU, m) {
  m.impl("largest_k", &supsup::largest_k);
  m.impl("masked_weight_grad_sign", &supsup::masked_weight_grad_sign);
  m.impl("threshold_words", &supsup::threshold_words);
  m.impl("topk_words", &supsup::topk_words);
  m.impl("pack_masks", &supsup::pack_masks);
  m.impl("unpack_masks", &supsup::unpack_masks);
  m.impl("apply_mask", &supsup::apply_mask);
  m.impl("masked_linear", &supsup::masked_linear);
  m.impl("masked_linear_grad_input", &supsup::masked_linear_grad_input);
  m.impl("masked_weight_grad", &supsup::masked_weight_grad);
  m.impl("superpose", &supsup::superpose);
  m.impl("mask_dots", &supsup::mask_dots);
  m.impl("masked_linear_grouped", &supsup::masked_linear_grouped);
  m.impl("masked_linear_seeded", &supsup::masked_linear_seeded);
  m.impl("signed_constant_fill_", &supsup::signed_constant_fill_);
  m.impl("seeded_fill_", &supsup::seeded_fill_);
  m.impl("ternary_linear", &supsup::ternary_linear);
  m.impl("ternary_linear_grad_input", &supsup::ternary_linear_grad_input);
}
