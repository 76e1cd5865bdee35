// Torch-facing helpers shared by the CPU and CUDA op implementations.  The
// Python layer validates arguments with messages that name them; these checks
// only guard direct torch.ops calls against memory errors.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

namespace rlk {

inline at::ScalarType out_dtype_for(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t T) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, name,
              " must have shape [", B, ", ", T, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline const uint8_t* optional_bool_ptr(const c10::optional<at::Tensor>& t,
                                        const char* name, int64_t B, int64_t T) {
  if (!t.has_value()) return nullptr;
  check_rows(*t, name, B, T);
  TORCH_CHECK(t->scalar_type() == at::kBool, name, " must be bool, got ", t->scalar_type());
  return reinterpret_cast<const uint8_t*>(t->data_ptr<bool>());
}

inline void check_same_device(const at::Tensor& ref, const c10::optional<at::Tensor>& t,
                              const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->device() == ref.device(), name, " is on ", t->device(),
                " but the inputs are on ", ref.device());
}

}  // namespace rlk
