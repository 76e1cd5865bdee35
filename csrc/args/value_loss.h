// value_loss: checks, outputs and the one ValueLossParams both backends read.
// Its scalars arrive as one list (see registration.cpp).
#pragma once
#include "../core/value_loss.h"
#include "token_loss.h"

namespace rlk {

inline ValueLossParams value_loss_args(const at::Tensor& values, const at::Tensor& old_values,
                                       const at::Tensor& returns, const c10::optional<at::Tensor>& mask,
                                       c10::ArrayRef<double> coefficients, c10::string_view agg, bool need_grad,
                                       TokenLossOutputs& out) {
  // [clip, num_tokens, num_seqs, norm_length]: clip inf for "off", -1 for "count it"
  const auto& c = coefficients;
  TORCH_CHECK(c.size() == 4, "value_loss takes 4 coefficients, got ", c.size());
  ValueLossParams p;
  p.clip = c[0];
  p.rows = token_loss_args(values, "values", mask, agg, c[1], c[2], c[3], kValueStats, need_grad, "value_loss", out);
  check_token_input(old_values, "old_values", values);
  check_token_input(returns, "returns", values);
  p.values = values.data_ptr();
  p.old_values = old_values.data_ptr();
  p.returns = returns.data_ptr();
  return p;
}

}  // namespace rlk
