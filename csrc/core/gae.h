// Generalised advantage estimation over one row, in reverse time order.
//
// Carry-through masking (verl semantics): a position with mask 0 is skipped,
// it neither bootstraps nor resets the running advantage; its output repeats
// the advantage of the next valid position.  Selection (not multiplication by
// the mask) keeps NaN or junk in skipped slots out of valid outputs.
// done[t] = 1 ends an episode after step t: nothing after t flows into t.
#pragma once
#include "common.h"

namespace rlk {

// One step of gae_row at time t (rows run backwards): `done` and `valid` are
// dones[t] and mask[t]; updates the running (next_value, carry), whose carry is
// then the advantage at t.
template <typename acc>
RLK_INLINE void gae_step(acc r, acc v, bool valid, bool done, acc gamma, acc gl, acc& next_value, acc& carry) {
  if (done) {
    next_value = acc(0);
    carry = acc(0);
  }
  const acc a = r + gamma * next_value - v + gl * carry;
  next_value = valid ? v : next_value;
  carry = valid ? a : carry;
}

template <typename in_t, typename out_t, typename acc = acc_t<in_t>>
RLK_INLINE void gae_row(const in_t* rewards, const in_t* values,
                        const uint8_t* mask, const uint8_t* dones,
                        acc last_value, int64_t T, acc gamma, acc lam,
                        out_t* advantages, out_t* returns) {
  acc next_value = last_value;
  acc carry = acc(0);
  const acc gl = gamma * lam;
  for (int64_t t = T - 1; t >= 0; --t) {
    const acc v = cast<acc>(values[t]);
    gae_step<acc>(cast<acc>(rewards[t]), v, mask == nullptr || mask[t] != 0, dones != nullptr && dones[t] != 0,
                  gamma, gl, next_value, carry);
    advantages[t] = cast<out_t>(carry);
    returns[t] = cast<out_t>(carry + v);
  }
}

// The same recurrence over R rows at once (row stride `stride`): R independent
// dependency chains keep the core busy where one row would wait on each
// multiply-add.  Used by the CPU kernel; results are identical to gae_row.
template <int R, bool kMask, bool kDones, typename in_t, typename out_t, typename acc = acc_t<in_t>>
inline void gae_rows(const in_t* __restrict__ rewards, const in_t* __restrict__ values,
                     const uint8_t* __restrict__ mask, const uint8_t* __restrict__ dones,
                     const acc* last_values, int64_t T, int64_t stride, acc gamma, acc lam,
                     out_t* __restrict__ advantages, out_t* __restrict__ returns) {
  acc next_value[R], carry[R];
  for (int r = 0; r < R; ++r) {
    next_value[r] = last_values ? last_values[r] : acc(0);
    carry[r] = acc(0);
  }
  const acc gl = gamma * lam;
  constexpr int64_t kAhead = 256;  // elements: software prefetch ~1 KiB ahead of the backward walk
  for (int64_t t = T - 1; t >= 0; --t) {
    if ((t & 15) == 0 && t >= kAhead) {
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(rewards + r * stride + t - kAhead);
        __builtin_prefetch(values + r * stride + t - kAhead);
      }
    }
#if !defined(__CUDACC__)
#pragma GCC unroll 8
#endif
    for (int r = 0; r < R; ++r) {
      const int64_t o = r * stride + t;
      const acc rw = cast<acc>(rewards[o]);
      const acc v = cast<acc>(values[o]);
      if (kDones) {
        const bool done = dones[o] != 0;
        next_value[r] = done ? acc(0) : next_value[r];
        carry[r] = done ? acc(0) : carry[r];
      }
      const acc a = rw + gamma * next_value[r] - v + gl * carry[r];
      if (kMask) {
        const bool valid = mask[o] != 0;
        next_value[r] = valid ? v : next_value[r];
        carry[r] = valid ? a : carry[r];
      } else {
        next_value[r] = v;
        carry[r] = a;
      }
      advantages[o] = cast<out_t>(carry[r]);
      returns[o] = cast<out_t>(carry[r] + v);
    }
  }
}

// Discounted reward-to-go with the same carry-through mask rule: one step, then
// the row.
template <typename acc>
RLK_INLINE void discounted_step(acc r, bool valid, bool done, acc gamma, acc& carry) {
  if (done) carry = acc(0);
  const acc g = r + gamma * carry;
  carry = valid ? g : carry;
}

template <typename in_t, typename out_t, typename acc = acc_t<in_t>>
RLK_INLINE void discounted_returns_row(const in_t* rewards, const uint8_t* mask,
                                       const uint8_t* dones, int64_t T,
                                       acc gamma, out_t* returns) {
  acc carry = acc(0);
  for (int64_t t = T - 1; t >= 0; --t) {
    discounted_step<acc>(cast<acc>(rewards[t]), mask == nullptr || mask[t] != 0, dones != nullptr && dones[t] != 0,
                         gamma, carry);
    returns[t] = cast<out_t>(carry);
  }
}

// The arguments of gae and discounted_returns, filled once by args/gae.h.
// [B, T] inputs of `dtype`, [B, T] outputs in its accumulation type;
// discounted_returns leaves values, last_values, lam and advantages unset.
struct GaeParams {
  int64_t B = 0, T = 0;
  Dtype dtype = Dtype::f32;
  const void* rewards = nullptr;
  const void* values = nullptr;
  const uint8_t* mask = nullptr;      // may be null
  const uint8_t* dones = nullptr;     // may be null
  const void* last_values = nullptr;  // [B] in the accumulation type, may be null
  double gamma = 1.0, lam = 1.0;
  void* advantages = nullptr;
  void* returns = nullptr;
};

// The CUDA launchers (gae.cu).
RLK_CUDA_LAUNCHER(launch_gae, GaeParams)
RLK_CUDA_LAUNCHER(launch_discounted_returns, GaeParams)

}  // namespace rlk
