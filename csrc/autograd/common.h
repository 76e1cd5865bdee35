// Shared by the C++ autograd kernels (TORCH_LIBRARY_IMPL(rlkernels, Autograd, m)) of the
// compiled ops.  Each op's torch::autograd::Function redispatches below autograd to the
// op (so the CPU and CUDA kernels, fake tensors and torch.compile all see the op itself)
// and calls its backward ops through the dispatcher.  The Triton twins keep the Python
// autograd of rlkernels/ops/_registry.py; docs/adding-an-op.md says where each piece lives.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/python.h>

#include <string>
#include <utility>
#include <vector>

#include "../dispatcher.h"

namespace rlk::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd runs a backward with grad mode on exactly when that backward is itself being
// recorded (create_graph=True, or a torch.func transform): the double-backward paths.
inline bool recording() { return at::GradMode::is_enabled(); }

// The double-backward paths are Python, one definition for the compiled ops and their
// Triton twins: rlkernels.ops._double_backward.from_cpp(name, *args) returns a tuple of
// tensors or None (None and undefined tensors map onto each other).  Only a recorded
// backward comes here, so the GIL and the import cost nothing on the first-order path.
template <class... Args>
variable_list python_backward(const char* name, Args&&... args) {
  pybind11::gil_scoped_acquire gil;
  pybind11::object fn = pybind11::module_::import("rlkernels.ops._double_backward").attr("from_cpp");
  pybind11::object result = fn(name, std::forward<Args>(args)...);
  variable_list out;
  for (pybind11::handle item : result) {
    out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
  }
  return out;
}

// The fused losses' backward outside a recorded backward: `grads` unchanged; inside one,
// the same values behind a node that raises when differentiated (_double_backward.py).
inline variable_list first_order_only(const char* public_name, variable_list grads, const variable_list& inputs) {
  if (!recording()) return grads;
  return python_backward("first_order_only", std::string(public_name), grads, inputs);
}

}  // namespace rlk::autograd

namespace rlk::autograd {

// Whether a call needs the autograd Function at all: the same test Function::apply makes,
// taken first so that calls without gradients skip building a node.
inline bool wants_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

inline const at::Tensor* maybe(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? &*t : &undefined;
}

}  // namespace rlk::autograd
