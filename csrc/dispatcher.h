// What the C++ that calls ops through the dispatcher shares: the device-generic op bodies
// (csrc/lm_head/) and the compiled ops' autograd (csrc/autograd/common.h).  Written once
// here so that both look ops up, pick a backend's kernels and decide whether a tensor's
// data may be read on the host the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace rlk {

// The op `rlkernels::<name>` with the C++ signature Sig.  The lookup takes a lock and a
// hash, so callers keep the handle in a static (per call site).
template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// The op `name`, or with `twin` its Triton twin `<name>_triton`.
template <class Sig>
c10::TypedOperatorHandle<Sig> op_or_twin(const std::string& name, bool twin) {
  return op<Sig>((twin ? name + "_triton" : name).c_str());
}

// The kernels a backend runs, made once per call site and backend: make(true) for backend
// "triton" (the Triton twins, registered from Python by rlkernels/ops/_registry.py; made on
// first use, by then they exist), make(false) for the others (the compiled ops).  The
// statics are per instantiation, so each call site passes a lambda (a type of its own).
template <class Make>
const auto& per_backend(c10::string_view backend, Make make) {
  if (backend == "triton") {
    static const auto twins = make(true);
    return twins;
  }
  static const auto compiled = make(false);
  return compiled;
}

// A plain CPU tensor: its data may be read on the host at no cost (no device sync) and
// without escaping a trace (no fake, functional, functorch-wrapped or symbolic tensor,
// which go the way of ATen ops instead).
inline bool host_readable(const at::Tensor& t) {
  return t.is_cpu() && t.has_storage() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !t.key_set().has_any(c10::functorch_transforms_ks) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

}  // namespace rlk
