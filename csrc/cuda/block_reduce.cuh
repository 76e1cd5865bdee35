// Deterministic block-wide reductions (fixed shuffle tree, fixed order of the
// per-warp partials) shared by the CUDA kernels.
#pragma once
#include <cuda_runtime.h>

namespace rlk {
namespace cuda {

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ inline T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_down_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ inline T warp_min(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_down_sync(0xffffffffu, v, offset);
    v = other < v ? other : v;
  }
  return v;
}

// Sum over the block; every thread receives the result.  `scratch` holds one
// slot per warp (blockDim.x <= 1024) and is reused after a barrier.
enum class Reduce { Sum, Max, Min };

template <Reduce kind, typename T>
__device__ inline T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = kind == Reduce::Sum ? warp_sum(v) : kind == Reduce::Max ? warp_max(v) : warp_min(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : scratch[0];
    if (kind == Reduce::Sum && lane >= warps) w = T(0);
    w = kind == Reduce::Sum ? warp_sum(w) : kind == Reduce::Max ? warp_max(w) : warp_min(w);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

}  // namespace cuda
}  // namespace rlk
