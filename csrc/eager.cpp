// Eager entries (eager.h). Why: for a small layer the Python around a kernel -- argument checks,
// the registry lookup, the dispatcher test -- costs more than the kernel (a 100x100 ternary GEMV
// computes in about 1.5 us). Here the same tests are a few loads each. Anything unusual returns
// None, and the caller's checked path (which names every problem) handles the call instead.
#include "eager.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cmath>
#include <optional>

#include "cpu/ops.h"

namespace supsup {
namespace {

// tensors that carry a transform or a Python-level dispatch: vmap's batched and grad's wrapped tensors,
// functionalization, __torch_dispatch__ subclasses seen from C++
const c10::DispatchKeySet kNotPlain =
    c10::DispatchKeySet({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                         c10::DispatchKey::Functionalize, c10::DispatchKey::Python});

// A torch.Tensor or nn.Parameter (no subclass), strided on CPU, with nothing for autograd to record.
const at::Tensor* plain_cpu_tensor(PyObject* obj, bool grad_mode) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || (grad_mode && t.requires_grad()) ||
      t.key_set().has_any(kNotPlain))
    return nullptr;
  return &t;
}

// an exact Python int in [lo, hi)
std::optional<int64_t> exact_int(PyObject* obj, int64_t lo, int64_t hi) {
  if (!PyLong_CheckExact(obj)) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || v < lo || v >= hi) {
    PyErr_Clear();
    return std::nullopt;
  }
  return v;
}

// What every entry needs of the thread's state: no dispatch mode (FakeTensorMode, a
// TorchDispatchMode), no CPU autocast region (the masked matmuls cast their inputs there) and no
// torch.jit.trace (which records the op only when it goes through the dispatcher).
bool plain_thread_state() {
  return !c10::impl::TorchDispatchModeTLS::any_modes_set() && !at::autocast::is_autocast_enabled(at::kCPU) &&
         !torch::jit::tracer::isTracing();
}

// An optional tensor argument: None, or a plain CPU tensor. False when it is neither.
bool optional_tensor(pybind11::handle obj, bool grad_mode, std::optional<at::Tensor>& out) {
  if (obj.is_none()) return true;
  const at::Tensor* t = plain_cpu_tensor(obj.ptr(), grad_mode);
  if (t == nullptr) return false;
  out = *t;
  return true;
}

// The kernel's result, computed without the GIL, or None where the kernel refuses its arguments
// (the checked path then says why).
template <typename Kernel>
pybind11::object run_or_none(Kernel&& kernel) {
  at::Tensor y;
  try {
    pybind11::gil_scoped_release no_gil;
    y = kernel();
  } catch (const c10::Error&) {
    return pybind11::none();
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(y)));
}

constexpr int64_t kSeedEnd = int64_t{1} << 32;  // seeds and layer ids are 32-bit (config.check_seed)

}  // namespace

pybind11::object ternary_linear_eager(pybind11::handle x_obj, pybind11::handle words_obj, pybind11::handle seed_obj,
                                      pybind11::handle layer_obj, pybind11::handle scale_obj, pybind11::handle bias_obj,
                                      pybind11::handle version_obj) {
  const pybind11::object none = pybind11::none();
  if (!plain_thread_state()) return none;
  const bool grad_mode = at::GradMode::is_enabled();
  const at::Tensor* x = plain_cpu_tensor(x_obj.ptr(), grad_mode);
  const at::Tensor* words = plain_cpu_tensor(words_obj.ptr(), grad_mode);
  std::optional<at::Tensor> bias;
  if (x == nullptr || words == nullptr || x->scalar_type() != at::kFloat || !optional_tensor(bias_obj, grad_mode, bias))
    return none;
  const auto seed = exact_int(seed_obj.ptr(), 0, kSeedEnd), layer = exact_int(layer_obj.ptr(), 0, kSeedEnd);
  const auto version = exact_int(version_obj.ptr(), 1, 3);
  if (!seed || !layer || !version || !PyFloat_CheckExact(scale_obj.ptr())) return none;
  const double scale = PyFloat_AS_DOUBLE(scale_obj.ptr());
  if (!std::isfinite(scale)) return none;
  return run_or_none([&] { return ternary_linear(*x, *words, *seed, *layer, scale, bias, *version); });
}

pybind11::object masked_linear_eager(pybind11::handle x_obj, pybind11::handle weight_obj, pybind11::handle words_obj,
                                     pybind11::handle bias_obj) {
  const pybind11::object none = pybind11::none();
  if (!plain_thread_state()) return none;
  const bool grad_mode = at::GradMode::is_enabled();
  const at::Tensor* x = plain_cpu_tensor(x_obj.ptr(), grad_mode);
  const at::Tensor* weight = plain_cpu_tensor(weight_obj.ptr(), grad_mode);
  const at::Tensor* words = plain_cpu_tensor(words_obj.ptr(), grad_mode);
  std::optional<at::Tensor> bias;
  if (x == nullptr || weight == nullptr || words == nullptr || x->scalar_type() != at::kFloat ||
      !optional_tensor(bias_obj, grad_mode, bias))
    return none;
  return run_or_none([&] { return masked_linear(*x, *weight, *words, bias); });
}

}  // namespace supsup
