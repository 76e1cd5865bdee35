// Masked mean and whitening: sums over the valid entries only (selection, so
// NaN in masked slots never enters), variance from a second pass over the
// deviations (no catastrophic cancellation).
#pragma once
#include <math.h>

#include "common.h"

namespace rlk {

template <typename acc> struct MaskedSums {
  acc sum;
  int64_t count;
};

template <typename in_t, typename acc>
RLK_INLINE MaskedSums<acc> masked_sums(const in_t* x, const uint8_t* mask, int64_t n) {
  acc sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool valid = mask == nullptr || mask[i] != 0;
    sum += valid ? cast<acc>(x[i]) : acc(0);
    count += valid;
  }
  return {sum, count};
}

template <typename in_t, typename acc>
RLK_INLINE acc masked_sq_dev(const in_t* x, const uint8_t* mask, int64_t n, acc mean) {
  acc sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc d = cast<acc>(x[i]) - mean;
    sq += (mask == nullptr || mask[i] != 0) ? d * d : acc(0);
  }
  return sq;
}

template <typename acc> struct WhitenCoef {
  acc mean, inv_std, shift;
};

// Unbiased variance (count - 1), as TRL's and verl's masked_whiten; fewer than
// two valid entries leave the variance at 0.
template <typename acc>
RLK_INLINE WhitenCoef<acc> whiten_coefficients(acc mean, acc sq_dev_sum, int64_t count, bool shift_mean,
                                               acc eps) {
  const acc var = count > 1 ? sq_dev_sum / acc(count - 1) : acc(0);
  return {mean, acc(1) / acc(sqrt(var + eps)), shift_mean ? acc(0) : mean};
}

template <typename acc>
RLK_INLINE acc whiten_value(acc x, bool valid, const WhitenCoef<acc>& c) {
  return valid ? (x - c.mean) * c.inv_std + c.shift : acc(0);
}

// How the GPU's masked_whiten cuts its n values among blocks: parts of
// whiten_part_size(n) values (a multiple of kWhitenTile, the last part shorter),
// at most kWhitenMaxParts of them.  The cut depends on n alone, and the parts'
// sums are merged in part order, so the result does not depend on the GPU.
constexpr int64_t kWhitenTile = 8192;
constexpr int64_t kWhitenMaxParts = 1024;

inline int64_t whiten_part_size(int64_t n) {
  const int64_t even = (n + kWhitenMaxParts - 1) / kWhitenMaxParts;
  const int64_t tiles = (even + kWhitenTile - 1) / kWhitenTile;
  return (tiles > 1 ? tiles : 1) * kWhitenTile;
}

inline int64_t whiten_parts(int64_t n) { return n > 0 ? (n + whiten_part_size(n) - 1) / whiten_part_size(n) : 0; }

// The arguments of masked_row_mean (rows x cols, a mean per row) and of
// masked_whiten (one row of every element), filled once by args/masked.h.
struct MaskedParams {
  int64_t rows = 0, cols = 0;
  Dtype dtype = Dtype::f32;
  const void* x = nullptr;
  const uint8_t* mask = nullptr;  // x's layout, may be null
  bool shift_mean = false;        // masked_whiten
  double eps = 0;                 // masked_whiten
  void* out = nullptr;            // in the accumulation type
  // masked_whiten on CUDA: 3 x 8 bytes per part (whiten_parts(cols)) of partial
  // counts, sums and squared deviations
  int64_t* workspace = nullptr;
};

// The CUDA launchers (masked.cu).
RLK_CUDA_LAUNCHER(launch_masked_row_mean, MaskedParams)
RLK_CUDA_LAUNCHER(launch_masked_whiten, MaskedParams)

}  // namespace rlk
