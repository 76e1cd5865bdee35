// Per-token math of the (optionally clipped) value loss, shared by the CPU
// and CUDA kernels:
//   L = 0.5 max((v - R)^2, (old + clamp(v - old, -clip, clip) - R)^2)
// without clip, L = 0.5 (v - R)^2.  Derivatives follow PyTorch's conventions
// (clamp passes on its closed interval, max splits ties).
#pragma once
#include "common.h"
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
  const acc pass = ((delta >= -clip) & (delta <= clip)) ? acc(1) : acc(0);
  acc d = delta < -clip ? -clip : delta;
  d = d > clip ? clip : d;
  const acc err_clipped = old_value + d - ret;
  const acc sq_clipped = err_clipped * err_clipped;
  const bool clip_wins = sq_clipped > sq;
  const bool tie = sq_clipped == sq;
  out.loss = acc(0.5) * (clip_wins ? sq_clipped : sq);
  const acc grad_plain = err;
  const acc grad_clipped = err_clipped * pass;
  out.grad = clip_wins ? grad_clipped : (tie ? acc(0.5) * (grad_plain + grad_clipped) : grad_plain);
  out.clipped = clip_wins ? acc(1) : acc(0);
  return out;
}

}  // namespace rlk
