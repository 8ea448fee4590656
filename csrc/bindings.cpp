// The Python module `supsup_fast._C`: the directly bound helpers. The op schemas are in csrc/ops.cpp.
#include <torch/extension.h>

#include "cpu/masked_gemm.h"
#include "cpu/ops.h"
#include "eager.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "supsup_fast compiled kernels; the ops live in torch.ops.supsup_fast_C";
  // masked_linear's CPU kernel without the dispatcher's boxing (a few microseconds that are most
  // of a small layer's call): the cpu_ext backend's kernel, which the op layer calls on plain
  // tensors only (autograd is recorded around it, never through it)
  m.def("masked_linear_cpu", &supsup::masked_linear, "masked_linear's CPU kernel, called directly",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // a plain eager float32 call of masked_linear in one native call, or None (eager.h)
  m.def("masked_linear_eager", &supsup::masked_linear_eager);
  // the AVX-512 masked GEMM (masked_linear with more than a few rows, fp32): whether the CPU
  // has it, and a switch to compare it with the AVX2 path it replaces
  m.def("cpu_has_avx512", &supsup::cpu_has_avx512);
  m.def("avx512_enabled", &supsup::masked_gemm_available);
  m.def("set_avx512_enabled", &supsup::set_avx512_enabled, pybind11::arg("enabled"));
  // the ternary kernels: the forward bound directly (as masked_linear_cpu), the seed format's
  // sign words for tests, and which ISA runs (a switch to compare them bit for bit)
  m.def("ternary_linear_cpu", &supsup::ternary_linear, "ternary_linear's CPU kernel, called directly",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  // a plain eager call of ternary_linear in one native call, or None (eager.h)
  m.def("ternary_linear_eager", &supsup::ternary_linear_eager);
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
