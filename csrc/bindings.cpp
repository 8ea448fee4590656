// Op schemas of the private `supsup_fast_C` namespace and the Python module `supsup_fast._C`.
//
// The schemas mirror supsup_fast/ops.py (_SCHEMAS); kernels are registered per dispatch key
// by csrc/cpu (CPU) and csrc/cuda (CUDA, when built with -DSUPSUP_WITH_CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/masked_gemm.h"
#include "cpu/ops.h"

TORCH_LIBRARY(supsup_fast_C, m) {
  m.def("pack_masks(Tensor masks) -> Tensor");
  m.def("unpack_masks(Tensor words, SymInt k, ScalarType dtype) -> Tensor");
  m.def("apply_mask(Tensor weight, Tensor mask_words) -> Tensor");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask_words) -> Tensor");
  m.def("masked_weight_grad(Tensor grad_out, Tensor x, Tensor weight) -> Tensor");
  m.def("superpose(Tensor weight, Tensor bank, Tensor alpha) -> Tensor");
  m.def("mask_dots(Tensor v, Tensor bank) -> Tensor");
  m.def("masked_linear_grouped(Tensor x, Tensor weight, Tensor bank, Tensor task_ids, Tensor? bias) -> Tensor");
  m.def("masked_linear_seeded(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias) -> Tensor");
  m.def("signed_constant_fill_(Tensor(a!) out, int seed, int layer, float scale) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "supsup_fast compiled kernels; the ops live in torch.ops.supsup_fast_C";
  // masked_linear's CPU kernel without the dispatcher's boxing (a few microseconds that are most
  // of a small layer's call): the cpu_ext backend's kernel, which the op layer calls on plain
  // tensors only (autograd is recorded around it, never through it)
  m.def("masked_linear_cpu", &supsup::masked_linear, "masked_linear's CPU kernel, called directly",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // the AVX-512 masked GEMM (masked_linear with more than a few rows, fp32): whether the CPU
  // has it, and a switch to compare it with the AVX2 path it replaces
  m.def("cpu_has_avx512", &supsup::cpu_has_avx512);
  m.def("avx512_enabled", &supsup::masked_gemm_available);
  m.def("set_avx512_enabled", &supsup::set_avx512_enabled, pybind11::arg("enabled"));
  // the ternary kernels: the forward bound directly (as masked_linear_cpu), the seed format's
  // sign words for tests, and which ISA runs (a switch to compare them bit for bit)
  m.def("ternary_linear_cpu", &supsup::ternary_linear, "ternary_linear's CPU kernel, called directly",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("seed_sign_words", &supsup::seed_sign_words, pybind11::arg("n"), pybind11::arg("k"), pybind11::arg("seed"),
        pybind11::arg("layer"), pybind11::arg("format_version"));
  m.def("ternary_isa", &supsup::ternary_isa);
  m.def("set_ternary_isa", &supsup::set_ternary_isa, pybind11::arg("name"));
#ifdef SUPSUP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
