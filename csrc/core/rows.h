// Row addressing for [..., V] tensors whose last dimension is contiguous.  The
// leading dimensions are merged where their strides allow; what remains must be
// at most two of them, [outer, inner], so a slice such as logits[:, :-1] of a
// contiguous [B, T + 1, V] tensor is read in place, without a copy.
#pragma once
#include "common.h"

namespace rlk {

struct RowIndex {
  int64_t inner;         // rows per outer step (>= 1)
  int64_t outer_stride;  // elements between outer steps
  int64_t inner_stride;  // elements between consecutive inner rows

  RLK_INLINE int64_t offset(int64_t row) const {
    const int64_t outer = row / inner;
    return outer * outer_stride + (row - outer * inner) * inner_stride;
  }
};

// Rows of a densely packed [N, V] buffer.
RLK_INLINE RowIndex dense_rows(int64_t V) { return RowIndex{1, V, V}; }

}  // namespace rlk
