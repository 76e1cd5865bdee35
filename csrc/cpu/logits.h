// What the CPU kernels over rows of logits share (logprobs, kl_from_logits):
// blocks that stay in L1, software prefetch, the vectorised block maximum, and
// the storage type each logits dtype is read as.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "../core/logprobs.h"
#include "simd.h"
#include "simd_loops.h"

namespace rlk {
namespace cpu {

using simd::hmax;
using simd::hsum;
using simd::load;
using simd::load_partial;
using simd::splat;
using simd::store;
using simd::store_partial;
using simd::to_float;
using simd::vf;
using simd::vmax;

// A block of logits stays in L1 between its max pass and its exp pass.
constexpr int64_t kBlock = 2048;
static_assert(kVocabChunk % kBlock == 0, "a vocabulary chunk is whole blocks");

// Software prefetch from inside the compute loops.  The forward is compute-bound
// on exp while its block sits in L1; without prefetch the next block's max pass
// then waits on memory, so compute and memory time add up (2.5 Gelem/s a core
// on the development machine, 3.5 with the next block prefetched during the exp
// pass: the row streams at the read roof with two threads).  Each loop step
// prefetches the cache lines of its kCount elements `ahead` elements further
// on (the address is formed as an integer: it may lie past the row or the
// tensor, which a prefetch tolerates and pointer arithmetic does not).
template <int kCount, class T>
RLK_ALWAYS_INLINE void prefetch_step(const T* p, int64_t ahead) {
  const uintptr_t c = reinterpret_cast<uintptr_t>(p) + uintptr_t(ahead) * sizeof(T);
  constexpr int kBytes = kCount * int(sizeof(T));
  for (int b = 0; b < kBytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(c + b), 0, 3);
}

// Single-pass loops (the backward passes) prefetch this many bytes ahead.
constexpr int64_t kStreamAheadBytes = 8192;


// The chunk rule's fold step (core/logprobs.h), compiled once, outside the per-ISA
// copies of the kernels: the whole-row kernel and the fold of chunk statistics that
// arrive from elsewhere (logprobs_vocab_tile's chunk states, the vocabulary-parallel
// exact mode) then run the same instructions, whereas differently targeted inlined
// copies may contract a * b + c into an FMA differently.
template <bool kEntropy>
__attribute__((noinline)) SoftmaxStats fold_chunk(SoftmaxStats acc, SoftmaxStats chunk, float scale) {
  return stats_merge<kEntropy>(acc, chunk, scale);
}

inline int64_t logits_row_grain(int64_t V) { return row_grain(V, kLogitsPerTask); }

// What every pass over rows of logits reads first: the logits as storage type
// T and softmax's scales (core/logprobs.h).
template <class T>
struct LogitsPass {
  const T* base;
  float scale, inv_t;

  template <class Params>
  RLK_ALWAYS_INLINE explicit LogitsPass(const Params& p)
      : base(static_cast<const T*>(p.logits)), scale(log2_scale(p.temperature)), inv_t(inv_temperature(p.temperature)) {}
};

// Max of the first n elements of a block, vectorised.
template <int W, class T>
RLK_ALWAYS_INLINE float block_max(const T* xb, int64_t n) {
  vf<W> mx0 = splat<W>(-INFINITY), mx1 = mx0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    vf<W> a, b;
    simd::load2<W>(xb + j, a, b);
    mx0 = vmax<W>(mx0, a);
    mx1 = vmax<W>(mx1, b);
  }
  for (; j + W <= n; j += W) mx0 = vmax<W>(mx0, load<W>(xb + j));
  if (j < n) mx1 = vmax<W>(mx1, load_partial<W>(xb + j, n - j, -INFINITY));
  return hmax<W>(vmax<W>(mx0, mx1));
}

// Runs Rows<S, flag>::run<W>(p, begin, end) over p.N rows in parallel, with S the
// storage type of the logits' dtype (f32, bf16 or f16: args/ checked it) and W
// the vector width of this CPU.
template <template <class, bool> class Rows, class Params>
void run_logits_rows(const Params& p, bool flag, int64_t grain) {
  auto run = [&](auto tag) {
    using S = decltype(tag);
    rlk::cpu::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
      if (flag) simd::run_simd<Rows<S, true>>(p, begin, end);
      else simd::run_simd<Rows<S, false>>(p, begin, end);
    });
  };
  switch (p.dtype) {
    case Dtype::bf16: return run(simd::bf16{});
    case Dtype::f16: return run(simd::fp16{});
    default: return run(float{});
  }
}

}  // namespace cpu
}  // namespace rlk
