// What the CUDA kernels over rows of logits share (logprobs, kl_from_logits):
// block sizes, the vectorised walk over one or two rows, and how a split row
// is cut into parts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../core/logprobs.h"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Backward: logits per block along the vocabulary.
constexpr int64_t kBackwardChunk = 4096;

template <typename T>
__device__ __forceinline__ int64_t misalignment(const T* p) {
  return int64_t(reinterpret_cast<uintptr_t>(p) & 15);
}

// Calls f(j, a_j, b_j) for j in [0, n) over the block's threads, with 16-byte
// loads where both rows share their alignment (b may equal a, kTwo = false reads only a).
template <typename T, bool kTwo, typename F>
__device__ __forceinline__ void for_each(const T* a, const T* b, int64_t n, F&& f) {
  constexpr int kPack = 16 / sizeof(T);
  int64_t head = n;
  if (!kTwo || misalignment(a) == misalignment(b)) {
    head = ((16 - misalignment(a)) & 15) / int64_t(sizeof(T));
    if (head > n) head = n;
  }
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x)
    f(j, cast<float>(a[j]), kTwo ? cast<float>(b[j]) : 0.0f);
  const int64_t packs = (n - head) / kPack;
  const uint4* av = reinterpret_cast<const uint4*>(a + head);
  const uint4* bv = reinterpret_cast<const uint4*>(b + head);
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
    const uint4 ra = __ldg(av + k);
    const uint4 rb = kTwo ? __ldg(bv + k) : ra;
    const T* va = reinterpret_cast<const T*>(&ra);
    const T* vb = reinterpret_cast<const T*>(&rb);
#pragma unroll
    for (int e = 0; e < kPack; ++e) f(head + k * kPack + e, cast<float>(va[e]), kTwo ? cast<float>(vb[e]) : 0.0f);
  }
  for (int64_t j = head + packs * kPack + threadIdx.x; j < n; j += blockDim.x)
    f(j, cast<float>(a[j]), kTwo ? cast<float>(b[j]) : 0.0f);
}

inline int64_t split_chunk(int64_t V, int splits) {
  const int64_t chunk = (V + splits - 1) / splits;
  return (chunk + 15) / 16 * 16;  // parts start 16-element aligned relative to the row
}

inline unsigned int blocks_for(int64_t count, int per_block) { return static_cast<unsigned int>((count + per_block - 1) / per_block); }

// The launch of a forward (logprobs or kl_from_logits): softmax's scales, the
// columns per block (the whole row, or one part of a row split over p.splits
// blocks), the (row, part) grid, and where parts leave their partial
// statistics (null without a split).
struct ForwardLaunch {
  float scale, inv_t;
  int64_t chunk;
  dim3 grid;
  float* partial;
};

template <class Params>
ForwardLaunch forward_launch(const Params& p) {
  ForwardLaunch f;
  f.scale = log2_scale(p.temperature);
  f.inv_t = inv_temperature(p.temperature);
  f.chunk = p.splits > 1 ? split_chunk(p.V, p.splits) : (p.V > 0 ? p.V : 1);
  f.grid = dim3(static_cast<unsigned int>(p.N), static_cast<unsigned int>(p.splits));
  f.partial = p.splits > 1 ? p.workspace : nullptr;
  return f;
}

}  // namespace
}  // namespace cuda
}  // namespace rlk
