// What the CPU kernels of policy_loss and value_loss share: the chunked pass
// over [B, T] rows keeps each chunk's per-token values in L1 between the
// element-wise pass and the reductions (see cpu/policy_loss.cpp).
#pragma once
#include <cstdint>

#include "../core/token_loss.h"
#include "simd_loops.h"

namespace rlk {
namespace cpu {

// Per-token values of one chunk, kept in L1 between the arithmetic pass and
// the reductions.
template <typename acc, int kArrays>
struct ChunkScratch {
  alignas(64) acc values[kArrays][kChunk];
  alignas(64) int32_t flags[kChunk];
  alignas(64) acc grad[kChunk];  // the gradient goes here when nobody wants it
};

// Valid tokens of a chunk (an integer sum over the mask bytes vectorises).
RLK_FORCE_INLINE int64_t count_valid(const uint8_t* __restrict__ valid, int64_t n) {
  int32_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += valid[i];
  return count;
}

}  // namespace cpu
}  // namespace rlk
