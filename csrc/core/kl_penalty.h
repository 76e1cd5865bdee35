// Per-token KL penalty estimators (Schulman's k1, k2, k3 and verl's variants),
// shared by the CPU and CUDA kernels.  With r = logprob - ref_logprob:
//   k1  (kl):          r                                       slope 1
//   k2  (mse):         r^2 / 2                                 slope r
//   k3  (low_var_kl):  e^{c} - c - 1, c = clamp(-r, -20, 20)   slope (1 - e^{c}) where |r| <= 20, else 0
//                      (Schulman's (rho - 1) - log rho with rho = p_ref / p = e^{-r}; verl's low_var_kl)
//   abs:               |r|                                     slope sign(r)
//   k1+, k3+:          the value of k1 / k3, the slope of k2 (straight-through)
// The value is clamped to [-clamp, clamp] (k3 defaults to verl's 10); outside the
// clamp the slope is 0, as torch.clamp's gradient, except for the straight-through
// kinds whose slope is always k2's.  `slope` is d value / d logprob; the gradient of
// ref_logprob is its negation.  NaN inputs give NaN values (and a zero slope where a
// clamp applies, as in torch).
#pragma once
#include <math.h>
#include <string.h>

#include "common.h"
#include "vec_math.h"

namespace rlk {

enum KlKind : int { kKlK1 = 0, kKlK2 = 1, kKlK3 = 2, kKlAbs = 3, kKlK1Plus = 4, kKlK3Plus = 5 };

// The kind's code, or -1 for an unknown name (host only).
inline int kl_kind_code(const char* name) {
  static const struct { const char* name; int code; } kinds[] = {
      {"k1", kKlK1}, {"kl", kKlK1}, {"k2", kKlK2}, {"mse", kKlK2}, {"k3", kKlK3}, {"low_var_kl", kKlK3},
      {"abs", kKlAbs}, {"k1+", kKlK1Plus}, {"k3+", kKlK3Plus}};
  for (const auto& k : kinds)
    if (strcmp(name, k.name) == 0) return k.code;
  return -1;
}

template <typename acc>
RLK_INLINE acc clamp_keep_nan(acc x, acc lo, acc hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Straight-line selects and exp_acc (vec_math.h), so that the CPU loop over
// elements vectorises, and every backend rounds e^c the same way.
template <typename acc>
RLK_FORCE_INLINE void kl_penalty_element(acc logprob, acc ref_logprob, int kind, acc clamp, acc* value, acc* slope) {
  const acc r = logprob - ref_logprob;
  acc v, d;
  switch (kind) {
    case kKlK2:
      v = acc(0.5) * r * r;
      d = r;
      break;
    case kKlAbs:
      v = r < acc(0) ? -r : r;
      d = r > acc(0) ? acc(1) : (r < acc(0) ? acc(-1) : r * acc(0));  // sign; NaN stays NaN
      break;
    case kKlK3:
    case kKlK3Plus: {
      const acc c = -r;
      const bool inside = (c >= acc(-20)) & (c <= acc(20));
      const acc cc = clamp_keep_nan(c, acc(-20), acc(20));
      const acc ratio = exp_acc(cc);
      v = ratio - cc - acc(1);
      d = inside ? acc(1) - ratio : acc(0);
      break;
    }
    default:  // k1, k1+
      v = r;
      d = acc(1);
      break;
  }
  const bool straight_through = kind == kKlK1Plus || kind == kKlK3Plus;
  // Selects rather than an `if (clamp < inf)` block: clamping to [-inf, inf] leaves
  // v as it is, and `clamps` keeps d (NaN included) when there is no clamp.
  const bool clamps = clamp < acc(INFINITY);
  const bool outside = !((v >= -clamp) & (v <= clamp));
  v = clamp_keep_nan(v, -clamp, clamp);
  d = (clamps & outside) ? acc(0) : d;
  if (straight_through) d = r;
  *value = v;
  *slope = d;
}

// The arguments of kl_penalty, filled once by args/kl_penalty.h: n contiguous
// elements of `dtype` in, value and slope out in the accumulation type.
struct KlPenaltyParams {
  int64_t n = 0;
  Dtype dtype = Dtype::f32;
  const void* logprobs = nullptr;
  const void* ref_logprobs = nullptr;
  int kind = kKlK1;
  double clamp = 0;
  void* value = nullptr;
  void* slope = nullptr;
};

// The CUDA launchers (kl_penalty.cu).
RLK_CUDA_LAUNCHER(launch_kl_penalty, KlPenaltyParams)

}  // namespace rlk
