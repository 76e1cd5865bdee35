// masked_row_mean and masked_whiten: checks, outputs and the MaskedParams both
// backends read (the Python layer validates first, naming the argument).
#pragma once
#include "../core/masked.h"
#include "../torch_common.h"

namespace rlk {

inline MaskedParams masked_row_mean_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                                         at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2, "x must be [R, C], got ", x.sizes());
  check_rows(x, "x", x.size(0), x.size(1));
  check_same_device(x, mask, "mask");
  MaskedParams p;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.mask = optional_bool_ptr(mask, "mask", p.rows, p.cols);
  p.dtype = dtype_of(x.scalar_type(), "masked_row_mean");
  p.x = x.data_ptr();
  out = empty_acc({p.rows}, x);
  p.out = out.data_ptr();
  return p;
}

// masked_whiten treats x (any shape, contiguous) as one row of x.numel() values.
inline MaskedParams masked_whiten_args(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                                       double eps, at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  check_same_device(x, mask, "mask");
  MaskedParams p;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == x.numel(),
                "mask must be a contiguous bool tensor of x's size");
    p.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
  p.rows = 1;
  p.cols = x.numel();
  p.dtype = dtype_of(x.scalar_type(), "masked_whiten");
  p.x = x.data_ptr();
  p.shift_mean = shift_mean;
  p.eps = eps;
  out = empty_acc(x.sizes(), x);
  p.out = out.data_ptr();
  return p;
}

}  // namespace rlk
