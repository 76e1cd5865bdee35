// What the argument handling of policy_loss and value_loss shares (checks,
// outputs, TokenLossParams), and scale_rows, their backward.  The Python layer
// validates first, naming the argument; these checks keep direct torch.ops
// calls memory-safe.
#pragma once
#include <string>

#include "../core/token_loss.h"
#include "../torch_common.h"

namespace rlk {

inline Agg parse_agg(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "token-mean") return Agg::token_mean;
  if (name == "token-sum") return Agg::token_sum;
  if (name == "seq-mean-token-sum") return Agg::seq_mean_token_sum;
  if (name == "seq-mean-token-mean") return Agg::seq_mean_token_mean;
  if (name == "seq-mean-token-sum-norm") return Agg::seq_mean_token_sum_norm;
  TORCH_CHECK(false, "unknown agg ", name);
}

// [B, T] input of the loss's dtype, or a per-row [B] input when `per_row_ok`.
// Returns whether it is per-row.
inline bool check_token_input(const at::Tensor& t, const char* name, const at::Tensor& like,
                              bool per_row_ok = false) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the inputs are on ",
              like.device());
  if (per_row_ok && t.dim() == 1) {
    TORCH_CHECK(t.size(0) == like.size(0) && t.is_contiguous(), name,
                " must be a contiguous [B] or [B, T] tensor");
    return true;
  }
  check_rows(t, name, like.size(0), like.size(1));
  return false;
}

// The outputs of a token loss: the loss, its statistics, the per-token
// gradient (empty unless wanted) and the per-row gradient scales.
struct TokenLossOutputs {
  at::Tensor loss, stats, grad, row_scale;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const { return {loss, stats, grad, row_scale}; }
};

// The [B, T] input x (the first of the loss), the mask and agg; the
// normalisers come from the op's coefficient list.
inline TokenLossParams token_loss_args(const at::Tensor& x, const char* name, const c10::optional<at::Tensor>& mask,
                                       c10::string_view agg, double num_tokens, double num_seqs,
                                       double norm_length, int64_t num_stats, bool need_grad, const char* op,
                                       TokenLossOutputs& out) {
  TORCH_CHECK(x.dim() == 2, name, " must be [B, T], got ", x.sizes());
  TokenLossParams p;
  p.B = x.size(0);
  p.T = x.size(1);
  check_rows(x, name, p.B, p.T);
  check_same_device(x, mask, "mask");
  p.mask = optional_bool_ptr(mask, "mask", p.B, p.T);
  p.agg = parse_agg(agg);
  p.dtype = dtype_of(x.scalar_type(), op);
  p.num_tokens = num_tokens;
  p.num_seqs = num_seqs;
  p.norm_length = norm_length;
  out.loss = empty_acc({}, x);
  out.stats = empty_acc({num_stats}, x);
  out.grad = need_grad ? empty_acc({p.B, p.T}, x) : empty_acc({0}, x);
  out.row_scale = empty_acc({p.B}, x);
  p.grad = need_grad ? out.grad.data_ptr() : nullptr;
  p.row_scale = out.row_scale.data_ptr();
  p.loss = out.loss.data_ptr();
  p.stats = out.stats.data_ptr();
  return p;
}

// scale_rows (out[b, t] = grad[b, t] * row_scale[b] * grad_loss): checks, its
// [B, T] output in `dtype`, and grad_loss as one value of grad's dtype (which
// `grad_loss_value` keeps alive).
inline ScaleRowsParams scale_rows_args(const at::Tensor& grad, const at::Tensor& row_scale,
                                       const at::Tensor& grad_loss, at::ScalarType dtype, at::Tensor& out,
                                       at::Tensor& grad_loss_value) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "grad must be a contiguous [B, T] tensor");
  ScaleRowsParams p;
  p.B = grad.size(0);
  p.T = grad.size(1);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == p.B && row_scale.is_contiguous() &&
                  row_scale.scalar_type() == grad.scalar_type(), "row_scale must be a contiguous [B] tensor like grad");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must hold one value");
  TORCH_CHECK(grad.scalar_type() == out_dtype_for(dtype), "grad must be ", out_dtype_for(dtype));
  check_same_device(grad, row_scale, "row_scale");
  check_same_device(grad, grad_loss, "grad_loss");
  p.dtype = dtype_of(dtype, "scale_rows");
  out = at::empty({p.B, p.T}, grad.options().dtype(dtype));
  grad_loss_value = grad_loss.to(grad.scalar_type()).reshape({1}).contiguous();
  p.grad = grad.data_ptr();
  p.row_scale = row_scale.data_ptr();
  p.grad_loss = grad_loss_value.data_ptr();
  p.out = out.data_ptr();
  return p;
}

}  // namespace rlk
