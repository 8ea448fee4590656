// Every op schema of the private `supsup_fast_C` namespace, in one place.
//
// Kernels are registered per dispatch key by csrc/cpu/register.cpp (CPU) and
// csrc/cuda/ops_binding.cpp (CUDA, when built with -DSUPSUP_WITH_CUDA). The ops the Python op
// layer dispatches to (supsup_fast/ops/) have the same schemas there; tests/ops/test_schemas.py
// compares the two.
#include <torch/library.h>

TORCH_LIBRARY(supsup_fast_C, m) {
  // packed masks
  m.def("pack_masks(Tensor masks) -> Tensor");
  m.def("unpack_masks(Tensor words, SymInt k, ScalarType dtype) -> Tensor");
  // one task's mask
  m.def("apply_mask(Tensor weight, Tensor mask_words) -> Tensor");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask_words) -> Tensor");
  m.def("masked_weight_grad(Tensor grad_out, Tensor x, Tensor weight) -> Tensor");
  m.def("masked_weight_grad_sign(Tensor grad_out, Tensor x, Tensor weight, Tensor scores) -> Tensor");
  // a bank of masks
  m.def("superpose(Tensor weight, Tensor bank, Tensor alpha) -> Tensor");
  m.def("mask_dots(Tensor v, Tensor bank) -> Tensor");
  m.def("masked_linear_grouped(Tensor x, Tensor weight, Tensor bank, Tensor task_ids, Tensor? bias) -> Tensor");
  // the signed-constant base regenerated from its seed
  m.def("masked_linear_seeded(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias) -> Tensor");
  m.def("signed_constant_fill_(Tensor(a!) out, int seed, int layer, float scale) -> ()");
  // seed formats 1 and 2 (supsup_fast/seed_format.py): the fill, and the ternary layer reading mask words only
  m.def("seeded_fill_(Tensor(a!) out, int seed, int layer, float scale, int format_version) -> ()");
  // unwrapped: tests/ops/test_schemas.py reads each name from the line holding m.def and its schema
  // clang-format off
  m.def("ternary_linear(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias, "
        "int format_version) -> Tensor");
  m.def("ternary_linear_grad_input(Tensor grad_out, Tensor mask_words, int k, int seed, int layer, float scale, "
        "int format_version) -> Tensor");
  // clang-format on
  // the binarisers' selections (CPU only)
  m.def("largest_k(Tensor a, int k, bool magnitude=False) -> Tensor");
  m.def("threshold_words(Tensor scores) -> Tensor");
  m.def("topk_words(Tensor scores, int k) -> Tensor");
}
