// The lm-head matmuls shared by the C++ bodies of linear_logprobs and linear_ppo_loss
// (csrc/lm_head/): logits = hidden @ weight.T (+ bias) into a caller's buffer, every
// matmul on a multiple of kGemmRows rows (core/lm_head.h), so a token's logits are the
// same bits whatever the batch or op it is in (docs/numerics.md).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../core/lm_head.h"
#include "gemm.h"

namespace rlk::lm_head {

inline void logits_into(const at::Tensor& buffer, const at::Tensor& hidden, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    gemm_bias_out(buffer, *bias, hidden, weight.t());
  } else {
    gemm_out(buffer, hidden, weight.t());
  }
}

// Rows [start, stop) of t: t itself when that is all of it (a view costs a microsecond
// at the sizes where per-call cost matters).
inline at::Tensor rows_of(const at::Tensor& t, int64_t start, int64_t stop) {
  return start == 0 && stop == t.size(0) ? t : t.slice(0, start, stop);
}

// The rows of `hidden` a token chunk's matmuls see: the largest multiple of kGemmRows
// in place, the remaining rows copied into kGemmRows zero rows (`staged`, made once per
// token chunk and shared by its vocabulary blocks).
struct RowChunk {
  at::Tensor whole;   // [whole rows, H] (undefined when none)
  at::Tensor staged;  // [kGemmRows, H] (undefined when none)
  int64_t n = 0, whole_rows = 0;

  explicit RowChunk(const at::Tensor& hidden) : n(hidden.size(0)) {
    whole_rows = n - n % kGemmRows;
    if (whole_rows) whole = rows_of(hidden, 0, whole_rows);
    if (whole_rows < n) {
      staged = at::zeros({kGemmRows, hidden.size(1)}, hidden.options());
      rows_of(staged, 0, n - whole_rows).copy_(rows_of(hidden, whole_rows, n));
    }
  }

  // hidden @ weight.T (+ bias) into buffer's first padded_rows(n) rows; returns the n rows.
  at::Tensor logits(const at::Tensor& buffer, const at::Tensor& weight, const std::optional<at::Tensor>& bias) const {
    if (whole_rows) logits_into(rows_of(buffer, 0, whole_rows), whole, weight, bias);
    if (whole_rows < n) logits_into(rows_of(buffer, whole_rows, whole_rows + kGemmRows), staged, weight, bias);
    return rows_of(buffer, 0, n);
  }
};

}  // namespace rlk::lm_head
