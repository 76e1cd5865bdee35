// Torch-facing helpers shared by the CPU and CUDA op implementations.  The
// Python layer validates arguments with messages that name them; these checks
// only guard direct torch.ops calls against memory errors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "core/common.h"

namespace rlk {

// The params structs' name for a floating dtype (the ops take no other).
inline Dtype dtype_of(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, op, ": not implemented for '", c10::toString(type), "'");
  }
}

// The accumulation dtype of a 16/32/64-bit input, which the ops output in.
inline at::ScalarType out_dtype_for(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// An empty tensor of `shape` in the accumulation dtype of `like`, on its device.
inline at::Tensor empty_acc(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().dtype(out_dtype_for(like.scalar_type())));
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

// The data of an optional tensor, or null.
inline const void* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

inline void check_same_device(const at::Tensor& ref, const c10::optional<at::Tensor>& t,
                              const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->device() == ref.device(), name, " is on ", t->device(),
                " but the inputs are on ", ref.device());
}

}  // namespace rlk

// ---- rows of [..., V] tensors (logprobs, kl_from_logits) ------------------------------------
#include <vector>

#include "core/rows.h"

namespace rlk {

// Rows of `t` (last dim V with unit stride) as a RowIndex, merging leading dims
// whose strides allow it; false when more than two leading dims remain.
inline bool row_index_of(const at::Tensor& t, RowIndex* out) {
  const int64_t lead = t.dim() - 1;
  TORCH_CHECK(lead >= 0, "expected a tensor with a last (vocabulary) dimension");
  for (int64_t d = 0; d < lead; ++d) {
    if (t.size(d) == 0) {  // no rows: any layout addresses them (and an empty tensor's strides are arbitrary)
      *out = dense_rows(t.size(-1));
      return true;
    }
  }
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  int64_t sizes[2] = {1, 1}, strides[2] = {0, 0};
  int count = 0;
  for (int64_t d = lead - 1; d >= 0; --d) {  // innermost first
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (count > 0 && stride == strides[count - 1] * sizes[count - 1]) {
      sizes[count - 1] *= size;
      continue;
    }
    if (count == 2) return false;
    sizes[count] = size;
    strides[count] = stride;
    ++count;
  }
  const int64_t V = t.size(-1);
  if (count == 0) *out = RowIndex{1, V, V};
  else if (count == 1) *out = RowIndex{sizes[0], strides[0] * sizes[0], strides[0]};
  else *out = RowIndex{sizes[0], strides[1], strides[0]};
  return true;
}

// `t` itself when its rows can be addressed in place, else a contiguous copy.
inline at::Tensor rows_readable(const at::Tensor& t, RowIndex* rows) {
  if (row_index_of(t, rows)) return t;
  at::Tensor copy = t.contiguous();
  TORCH_CHECK(row_index_of(copy, rows), "internal: contiguous tensor without a row layout");
  return copy;
}

inline int64_t leading_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) n *= t.size(d);
  return n;
}

// The leading shape of t (all but the last dim), plus `extra` as a last dim when >= 0.
inline std::vector<int64_t> leading_shape(const at::Tensor& t, int64_t extra = -1) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  if (extra >= 0) shape.push_back(extra);
  return shape;
}

}  // namespace rlk
