// Every rlkernels schema, in one place.  Backends add implementations with
// TORCH_LIBRARY_IMPL in their own files; Triton kernels register from Python
// as rlkernels::<op>_triton.
#include <torch/library.h>

TORCH_LIBRARY(rlkernels, m) {
  // Advantage estimators (forward only: advantages are constants in training).
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? dones, Tensor? last_values, "
        "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? dones, float gamma) -> Tensor");

  // Parameter averaging (rlkernels.distributed): many tensors <-> one flat
  // bucket with an optional scale and dtype cast, and one gossip mixing step
  // out = w_self * x + w_left * left + w_right * right (out may alias x).
  m.def("pack_tensors(Tensor[] tensors, Tensor(a!) bucket, float scale) -> ()");
  m.def("unpack_tensors(Tensor bucket, Tensor(a!)[] tensors, float scale) -> ()");
  m.def("gossip_mix(Tensor x, Tensor left, Tensor right, float w_self, float w_left, float w_right, "
        "Tensor(a!) out) -> ()");
}
