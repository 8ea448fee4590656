// Eager entries: one native call for a plain eager call of an op (supsup_fast/ops/_fastpath.py).
#pragma once

#include <torch/extension.h>

namespace supsup {

// ternary_linear(x, mask_words, seed, layer, scale, bias, format_version) on the CPU kernel, or None
// when the call is not one it serves: any argument not a plain tensor / exact int / finite float,
// x not float32 on CPU, something for autograd, a dispatch mode, CPU autocast or functorch to see, or arguments
// the kernel refuses (the caller's checked path then names the problem).
pybind11::object ternary_linear_eager(pybind11::handle x, pybind11::handle mask_words, pybind11::handle seed,
                                      pybind11::handle layer, pybind11::handle scale, pybind11::handle bias,
                                      pybind11::handle format_version);

// masked_linear(x, weight, mask_words, bias) on the CPU kernel, or None under the same rules (x float32).
pybind11::object masked_linear_eager(pybind11::handle x, pybind11::handle weight, pybind11::handle mask_words,
                                     pybind11::handle bias);

}  // namespace supsup
