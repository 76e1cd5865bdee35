// Per-token math of the (optionally clipped) value loss, shared by the CPU
// and CUDA kernels:
//   L = 0.5 max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2)
// without clip, L = 0.5 (v - R)^2.  Derivatives follow PyTorch's conventions
// (clamp passes on its closed interval, max splits ties).  A token counts as
// clipped when v - old lies outside [-clip, clip] and the clipped term is
// strictly the larger.
#pragma once
#include <math.h>

#include "common.h"
#include "token_loss.h"
#include "vec_math.h"

namespace rlk {

constexpr int kValueClipped = 2;  // the clipped branch is strictly larger
constexpr int kValueSlots = 3;
// stats output: clip_frac, num_tokens
constexpr int kValueStats = 2;

template <typename acc>
struct ValueToken {
  acc loss;
  acc grad;     // d loss / d value
  acc clipped;  // 0 or 1
};

template <bool kClip, typename acc>
RLK_FORCE_INLINE ValueToken<acc> value_token(acc value, acc old_value, acc ret, acc clip) {
  ValueToken<acc> out;
  const acc err = value - ret;
  const acc sq = err * err;
  if (!kClip) {
    out.loss = acc(0.5) * sq;
    out.grad = err;
    out.clipped = acc(0);
    return out;
  }
  const acc delta = value - old_value;
  // Inside [-clip, clip] both terms are equal in exact arithmetic: take the
  // plain one rather than let rounding pick (verl's comparison counts such
  // rounding noise as clipping).  Outside, clamp is constant, so the clipped
  // term has slope 0; torch.max splits ties.
  const bool active = !((delta >= -clip) & (delta <= clip));
  const acc bound = delta < acc(0) ? -clip : clip;
  const acc err_clipped = old_value + bound - ret;
  const acc sq_clipped = err_clipped * err_clipped;
  const bool clip_wins = active & (sq_clipped > sq);
  const bool tie = active & (sq_clipped == sq);
  // A NaN old value makes the clipped term NaN: max() must not drop it (nor its gradient).
  const bool clipped_nan = sq_clipped != sq_clipped;
  out.loss = acc(0.5) * ((clip_wins | clipped_nan) ? sq_clipped : sq);
  out.grad = clipped_nan ? sq_clipped : (clip_wins ? acc(0) : (tie ? acc(0.5) * err : err));
  out.clipped = clip_wins ? acc(1) : acc(0);
  return out;
}

// The arguments of value_loss, filled once by args/value_loss.h.
struct ValueLossParams {
  TokenLossParams rows;
  const void* values = nullptr;
  const void* old_values = nullptr;
  const void* returns = nullptr;
  double clip = INFINITY;  // +inf: no clipping
};

// The CUDA launchers (value_loss.cu).
RLK_CUDA_LAUNCHER(launch_value_loss, ValueLossParams)

}  // namespace rlk
