// Torch-side argument handling shared by the CPU and CUDA implementations of
// the token-level losses.  The Python layer validates with messages naming
// the argument; these checks only keep direct torch.ops calls memory-safe.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <string>

#include "core/loss_agg.h"
#include "core/policy_loss.h"
#include "core/preference.h"
#include "torch_common.h"

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

inline KLKind parse_kl(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "none") return KLKind::none;
  if (name == "k1") return KLKind::k1;
  if (name == "k2") return KLKind::k2;
  if (name == "k3") return KLKind::k3;
  TORCH_CHECK(false, "unknown kl estimator ", name);
}

inline PreferenceKind parse_preference_kind(c10::string_view view) {
  const std::string name(view.data(), view.size());
  if (name == "sigmoid") return PreferenceKind::sigmoid;
  if (name == "ipo") return PreferenceKind::ipo;
  if (name == "hinge") return PreferenceKind::hinge;
  if (name == "robust") return PreferenceKind::robust;
  TORCH_CHECK(false, "unknown preference loss kind ", name);
}

inline void check_pairs(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0) && t.is_contiguous(), name,
              " must be a contiguous [B] tensor like policy_chosen");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of policy_chosen");
}

// The scalar arguments of policy_loss / value_loss (see registration.cpp).
struct PolicyCoefficients {
  double clip_low, clip_high, dual_clip, log_ratio_clamp, kl_coef, num_tokens, num_seqs, norm_length;
};
struct ValueCoefficients {
  double clip, num_tokens, num_seqs, norm_length;
};

inline PolicyCoefficients policy_coefficients(c10::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 8, "policy_loss takes 8 coefficients, got ", c.size());
  return {c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]};
}

inline ValueCoefficients value_coefficients(c10::ArrayRef<double> c) {
  TORCH_CHECK(c.size() == 4, "value_loss takes 4 coefficients, got ", c.size());
  return {c[0], c[1], c[2], c[3]};
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

struct TokenLossOutputs {
  at::Tensor loss, stats, grad, row_scale;
};

inline TokenLossOutputs token_loss_outputs(const at::Tensor& like, int64_t num_stats, bool need_grad) {
  const auto opts = like.options().dtype(out_dtype_for(like.scalar_type()));
  const int64_t B = like.size(0), T = like.size(1);
  TokenLossOutputs out;
  out.loss = at::empty({}, opts);
  out.stats = at::empty({num_stats}, opts);
  out.grad = need_grad ? at::empty({B, T}, opts) : at::empty({0}, opts);
  out.row_scale = at::empty({B}, opts);
  return out;
}

}  // namespace rlk
