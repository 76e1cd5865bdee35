// Every rlkernels schema, in one place.  Backends add implementations with
// TORCH_LIBRARY_IMPL in their own files; Triton kernels register from Python
// as rlkernels::<op>_triton.
#include <torch/library.h>

TORCH_LIBRARY(rlkernels, m) {
  // Advantage estimators (forward only: advantages are constants in training).
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? dones, Tensor? last_values, "
        "float gamma, float lam) -> (Tensor advantages, Tensor returns)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? dones, float gamma) -> Tensor");
}
