// What the CUDA kernels over rows of logits share (logprobs, kl_from_logits):
// block sizes, the vectorised walk over one or two rows, and how a row is cut
// into fixed vocabulary chunks.
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

// Logits per forward block.  A row is reduced as ceil(V / kVocabChunk) chunks of
// kVocabChunk logits (the last one shorter), each chunk's statistics from an
// empty state, merged in chunk order by a second small kernel; a row of at most
// kVocabChunk logits is one chunk, finished by its own block.  The cut depends on
// V alone, never on the number of rows or of SMs, so a row's result is the same
// bits alone as in any batch (with for_each's fixed thread assignment below).
constexpr int64_t kVocabChunk = 8192;
// Chunks run along gridDim.y.
constexpr int64_t kMaxVocabChunks = 65535;

inline int64_t vocab_chunks(int64_t V) { return V <= kVocabChunk ? 1 : (V + kVocabChunk - 1) / kVocabChunk; }

// Calls f(j, a_j, b_j) for j in [0, n) over the block's threads (kTwo = false
// reads only a).  Element j belongs to thread (j / kPack) % blockDim.x, and each
// thread visits its elements in increasing j, whatever the rows' addresses: with
// 16-byte loads when both rows start 16-byte aligned, one element at a time
// otherwise.  A reduction over f therefore rounds identically wherever the row
// lies (rows of odd V sit at every alignment inside a batch).
template <typename T, bool kTwo, typename F>
__device__ __forceinline__ void for_each(const T* a, const T* b, int64_t n, F&& f) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t packs = n / kPack;
  if (misalignment(a) == 0 && (!kTwo || misalignment(b) == 0)) {
    const uint4* av = reinterpret_cast<const uint4*>(a);
    const uint4* bv = reinterpret_cast<const uint4*>(b);
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const uint4 ra = __ldg(av + k);
      const uint4 rb = kTwo ? __ldg(bv + k) : ra;
      const T* va = reinterpret_cast<const T*>(&ra);
      const T* vb = reinterpret_cast<const T*>(&rb);
#pragma unroll
      for (int e = 0; e < kPack; ++e) f(k * kPack + e, cast<float>(va[e]), kTwo ? cast<float>(vb[e]) : 0.0f);
    }
  } else {
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        const int64_t j = k * kPack + e;
        f(j, cast<float>(a[j]), kTwo ? cast<float>(b[j]) : 0.0f);
      }
    }
  }
  // The last, partial pack belongs to the thread whose turn it is.
  if (packs * kPack < n && threadIdx.x == packs % blockDim.x)
    for (int64_t j = packs * kPack; j < n; ++j) f(j, cast<float>(a[j]), kTwo ? cast<float>(b[j]) : 0.0f);
}

inline unsigned int blocks_for(int64_t count, int per_block) { return static_cast<unsigned int>((count + per_block - 1) / per_block); }

// The launch of a forward (logprobs or kl_from_logits): softmax's scales, the
// columns per block (kVocabChunk, or the whole row when it is one chunk), the
// (row, chunk) grid, and where chunks leave their statistics (null for one chunk).
struct ForwardLaunch {
  float scale, inv_t;
  int64_t chunk;
  dim3 grid;
  float* partial;
};

// Whether a forward's grid holds p: N rows along x, its chunks along y, and
// p.splits (the caller's workspace: 3 or 5 floats per chunk) equal to them.
template <class Params>
bool forward_fits(const Params& p) {
  return p.N <= 0x7fffffff && p.splits == vocab_chunks(p.V) && p.splits <= kMaxVocabChunks;
}

template <class Params>
ForwardLaunch forward_launch(const Params& p) {
  ForwardLaunch f;
  f.scale = log2_scale(p.temperature);
  f.inv_t = inv_temperature(p.temperature);
  f.chunk = p.splits > 1 ? kVocabChunk : (p.V > 0 ? p.V : 1);
  f.grid = dim3(static_cast<unsigned int>(p.N), static_cast<unsigned int>(p.splits));
  f.partial = p.splits > 1 ? p.workspace : nullptr;
  return f;
}

}  // namespace
}  // namespace cuda
}  // namespace rlk
