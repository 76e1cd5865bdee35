// Masked sums over a row of values in fixed lanes (simd_loops.h lane_sum_by): the one
// masked reduction of the CPU kernels.  sequence_logprobs and dpo_sequence_loss
// (preference.cpp) and masked_mean / masked_whiten (masked.cpp) share it, so a masked
// row mean is sequence_logprobs(average=True)'s, and a row's sum does not depend on
// the batch or the thread count.  A plain `sum += x[i]` loop is one dependent add per
// element (the compiler may not reassociate it): 5-10x slower than these lanes.
// Internal linkage: each kernel file gets its own per-ISA clones (RLK_CPU_CLONES).
#pragma once
#include <algorithm>
#include <cstdint>

#include "simd_loops.h"

namespace rlk {
namespace cpu {
namespace {

// lane_sum of x[i] where valid[i] (exact zeros elsewhere: NaN in a masked slot stays
// out), and the count of valid entries, in one pass compiled per ISA level.
template <typename acc>
RLK_CPU_CLONES double masked_lane_sum(const acc* __restrict__ x, const uint8_t* __restrict__ valid, int64_t n,
                                      int64_t* __restrict__ count) {
  int64_t c = 0;
  const double sum = lane_sum_by<acc>(n, [&](int64_t i) {
    c += valid[i] != 0;
    return keep_if(valid[i] != 0, x[i]);
  });
  *count += c;
  return sum;
}

// lane_sum of (x[i] - mean)^2 where valid[i] (all of them without a mask).
template <typename acc>
RLK_CPU_CLONES double masked_lane_sq_dev(const acc* __restrict__ x, const uint8_t* __restrict__ valid, int64_t n,
                                         acc mean) {
  if (valid == nullptr) {
    return lane_sum_by<acc>(n, [&](int64_t i) {
      const acc d = x[i] - mean;
      return d * d;
    });
  }
  return lane_sum_by<acc>(n, [&](int64_t i) {
    const acc d = x[i] - mean;
    return keep_if(valid[i] != 0, d * d);
  });
}

// The masked sum of one row of T values (in chunks of kChunk: staged into `acc`, lane
// sums added in double across chunks) and its count of valid entries.
template <typename acc, typename scalar_t>
inline double row_sum(const scalar_t* x, const uint8_t* mask, int64_t T, acc* staging, int64_t* count) {
  double total = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    prefetch_ahead(x + t0, n);
    const acc* values = staged<acc>(x + t0, n, staging);
    if (mask != nullptr) {
      total += masked_lane_sum(values, mask + t0, n, count);
    } else {
      *count += n;
      total += lane_sum(values, n);
    }
  }
  return total;
}

// The masked sum of squared deviations from `mean` of one row of T values, chunked as row_sum.
template <typename acc, typename scalar_t>
inline double row_sq_dev(const scalar_t* x, const uint8_t* mask, int64_t T, acc mean, acc* staging) {
  double total = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    prefetch_ahead(x + t0, n);
    total += masked_lane_sq_dev(staged<acc>(x + t0, n, staging), mask == nullptr ? nullptr : mask + t0, n, mean);
  }
  return total;
}

}  // namespace
}  // namespace cpu
}  // namespace rlk
