// Log-probs and entropy from logits on the CPU (logprobs, its vocabulary tiles
// and its backward).
//
// Forward: one streaming pass per row, in chunks of kVocabChunk columns folded in
// order (the chunk rule, core/logprobs.h).  A chunk is read in blocks of kBlock
// elements that stay in L1: a max pass over the block, a rescale of the running
// sums when the maximum grew, then the exp pass (sum-exp and, for entropy, the
// weighted sum).  Memory traffic is the logits once; no [N, V] temporary exists.
// Backward: one more pass that recomputes p from the saved row statistics and
// writes the gradient in the logits' dtype, into a fresh tensor or into the logits
// buffer itself.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../args/logprobs.h"
#include "../core/logprobs.h"
#include "logits.h"

namespace rlk {
namespace {

// the SIMD layer and the row-pass helpers of logits.h
using namespace cpu;

// The statistics of one chunk (n <= kVocabChunk elements) from an empty state, in
// kBlock-wide blocks that stay in L1: the block's maximum, a rescale of the sums so
// far when it grew, then the exp pass.  Element j of the chunk always goes to the same
// lane, a function of j % (2 W) and the dtype (simd::load2), whatever the chunk's
// address (unaligned loads, no peeling), so the same values give the same bits anywhere.
template <int W, class T, bool kEntropy>
RLK_ALWAYS_INLINE SoftmaxStats chunk_stats(const T* x, int64_t V, float scale) {
  const vf<W> vscale = splat<W>(scale);
  SoftmaxStats st = stats_empty();
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const T* xb = x + b0;
    // a block that raises the maximum rescales the sums so far (core/logprobs.h)
    st = stats_merge<kEntropy>(st, SoftmaxStats{block_max<W>(xb, n), 0.0f, 0.0f}, scale);
    // While every logit so far is -inf, the shift 0 makes every y -inf (so e = 0).
    const vf<W> vm = splat<W>(st.m == -INFINITY ? 0.0f : st.m);
    vf<W> s0 = splat<W>(0.0f), s1 = s0, t0 = s0, t1 = s0;
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
      prefetch_step<2 * W>(xb + j, n);  // the next block (or row), for its max pass
      vf<W> x0, x1, y0, y1;  // y: the exponents, clamped where e underflows to 0
      simd::load2<W>(xb + j, x0, x1);
      const vf<W> e0 = simd::exp2<W>((x0 - vm) * vscale, y0);
      const vf<W> e1 = simd::exp2<W>((x1 - vm) * vscale, y1);
      s0 += e0;
      s1 += e1;
      if (kEntropy) {
        t0 += e0 * y0;
        t1 += e1 * y1;
      }
    }
    for (; j < n; j += W) {
      const vf<W> xv = j + W <= n ? load<W>(xb + j) : load_partial<W>(xb + j, n - j, -INFINITY);
      vf<W> y;
      const vf<W> e = simd::exp2<W>((xv - vm) * vscale, y);
      s1 += e;
      if (kEntropy) t1 += e * y;
    }
    st.s += hsum<W>(s0 + s1);
    if (kEntropy) st.t += hsum<W>(t0 + t1);
  }
  return st;
}

// V columns folded into `st` by the chunk rule (core/logprobs.h), chunks counted from x.
template <int W, class T, bool kEntropy>
RLK_ALWAYS_INLINE SoftmaxStats row_stats(const T* x, int64_t V, float scale, SoftmaxStats st = stats_empty()) {
  for (int64_t c0 = 0; c0 < V; c0 += kVocabChunk)
    st = fold_chunk<kEntropy>(st, chunk_stats<W, T, kEntropy>(x + c0, std::min(kVocabChunk, V - c0), scale), scale);
  return st;
}

// Labels must lie in [0, V) or be ignore_index (labels already checked for shape):
// the forward reads logits[label].  The tile ops see part of the vocabulary, so they
// pass the end they know (INT64_MAX before the last tile).  One pass over the labels
// before the kernel runs: ops called directly, or traced by torch.compile, get no
// check from the Python layer.
void check_label_range(int64_t V, const LogprobsParams& p, const char* op) {
  const int64_t* l = p.labels;
  const int64_t ignore_index = p.ignore_index;
  for (int64_t i = 0; i < p.N; ++i)
    TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), op, ": label ", l[i], " at flat index ", i,
                " is outside [0, ", V, ") and is not ignore_index");
}

// ---- logprobs forward -----------------------------------------------------------------------

template <class T, bool kEntropy>
struct ForwardRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const LogprobsParams& a, int64_t begin, int64_t end) {
    const LogitsPass<T> pass(a);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        a.logprobs[i] = 0.0f;
        if (kEntropy) a.entropy[i] = 0.0f;
        a.saved[2 * i] = 0.0f;
        a.saved[2 * i + 1] = 0.0f;
        continue;
      }
      const T* x = pass.base + a.rows.offset(i);
      const SoftmaxStats st = row_stats<W, T, kEntropy>(x, a.V, pass.scale);
      const float log_s = std::log(st.s);
      a.logprobs[i] = logprob_of(to_float(x[label]), st.m, log_s, pass.inv_t);
      if (kEntropy) a.entropy[i] = entropy_of(st);
      a.saved[2 * i] = st.m;
      a.saved[2 * i + 1] = log_s;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                            double temperature, int64_t ignore_index,
                                                            bool with_entropy, bool /*inplace_backward*/) {
  LogprobsOutputs out;
  const LogprobsParams p = logprobs_args(logits, labels, temperature, ignore_index, with_entropy, out);
  check_label_range(p.V, p, "logprobs");
  run_logits_rows<ForwardRows>(p, p.with_entropy, logits_row_grain(p.V));
  return {out.logprobs, out.entropy, out.saved};
}

// ---- one vocabulary tile of rows (linear_logprobs) ---------------------------------------------

// Whether any of x[0, n) is >= bound.
template <class T>
static bool any_at_least(const T* x, int64_t n, float bound) {
  for (int64_t j = 0; j < n; ++j)
    if (to_float(x[j]) >= bound) return true;
  return false;
}

template <class T, bool kEntropy>
struct TileRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const LogprobsParams& a, int64_t begin, int64_t end) {
    const LogitsPass<T> pass(a);
    for (int64_t i = begin; i < end; ++i) {
      float* state = a.state + a.width * i;
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        tile_stats_ignored(state, a.width);
        continue;
      }
      const T* x = pass.base + a.rows.offset(i);
      const SoftmaxStats before = tile_stats_in(state, a.vocab_start);
      // a tile that starts on a chunk edge continues the whole-row pass exactly
      const SoftmaxStats st = row_stats<W, T, kEntropy>(x, a.V, pass.scale, before);
      const int64_t local = label - a.vocab_start;
      const bool label_here = local >= 0 && local < a.V;
      const float x_label = label_here ? to_float(x[local]) : tile_label_in(state, a.vocab_start);
      float top1 = 0.0f;
      if (a.width == kTileWidthTop1) {
        // the scan of the columns before the label runs only when the label's logit is the largest so far
        const bool earlier = label_here && top1_candidate(x_label, st.m) && any_at_least(x, local, x_label);
        top1 = tile_top1_next(tile_top1_in(state, a.vocab_start), label_here, x_label, before.m, st.m, earlier);
      }
      tile_stats_out<kEntropy>(state, st, x_label, a.finish, pass.inv_t);
      if (a.width == kTileWidthTop1) state[4] = top1;
    }
  }
};

// The chunk-state mode of the tile op (core/logprobs.h): each chunk of the tile into
// its own slot, then, with finish, the fold of all the row's slots in chunk order, the
// very fold the whole-row forward runs.
template <class T, bool kEntropy>
struct ChunkTileRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const LogprobsParams& a, int64_t begin, int64_t end) {
    const LogitsPass<T> pass(a);
    const int64_t first = a.V > 0 ? chunk_of(a.vocab_start) : 0;
    for (int64_t i = begin; i < end; ++i) {
      float* slots = a.state + i * a.chunks * kTileWidth;
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        for (int64_t c = first; c < first + vocab_chunks(a.V); ++c) tile_stats_ignored(slots + c * kTileWidth);
        if (a.finish) tile_stats_ignored(slots);
        continue;
      }
      const T* x = pass.base + a.rows.offset(i);
      for (int64_t c0 = 0; c0 < a.V; c0 += kVocabChunk) {
        const int64_t n = std::min(kVocabChunk, a.V - c0);
        const SoftmaxStats st = chunk_stats<W, T, kEntropy>(x + c0, n, pass.scale);
        const int64_t local = label - a.vocab_start - c0;
        const float x_label = local >= 0 && local < n ? to_float(x[c0 + local]) : 0.0f;
        tile_stats_out<kEntropy>(slots + (first + c0 / kVocabChunk) * kTileWidth, st, x_label, false, pass.inv_t);
      }
      if (a.finish) {
        SoftmaxStats acc = stats_empty();
        for (int64_t c = 0; c < a.chunks; ++c) {
          const float* slot = slots + c * kTileWidth;
          acc = fold_chunk<kEntropy>(acc, SoftmaxStats{slot[0], slot[1], slot[2]}, pass.scale);
        }
        // the label lies in [0, vocab_start + V) (checked), so in one of the slots
        const float x_label = slots[chunk_of(label) * kTileWidth + 3];
        tile_stats_out<kEntropy>(slots, acc, x_label, true, pass.inv_t);
      }
    }
  }
};

void logprobs_vocab_tile_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                             double temperature, int64_t ignore_index, int64_t vocab_start, bool with_entropy,
                             bool finish) {
  at::Tensor x;
  const LogprobsParams p = logprobs_vocab_tile_args(logits, labels, state, temperature, ignore_index, vocab_start,
                                                    with_entropy, finish, x, /*chunk_states=*/true);
  check_label_range(finish ? vocab_start + p.V : INT64_MAX, p, "logprobs_vocab_tile");
  if (p.chunks > 0) run_logits_rows<ChunkTileRows>(p, p.with_entropy, logits_row_grain(std::max<int64_t>(p.V, 1)));
  else run_logits_rows<TileRows>(p, p.with_entropy, logits_row_grain(p.V));
}

// ---- logprobs backward ----------------------------------------------------------------------

template <class T, bool kEntropyGrad>
struct BackwardRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const LogprobsParams& a, int64_t begin, int64_t end) {
    const LogitsPass<T> pass(a);
    T* grad_base = static_cast<T*>(a.grad);
    const int64_t V = a.V;
    for (int64_t i = begin; i < end; ++i) {
      const T* x = pass.base + a.rows.offset(i);
      T* out = grad_base + a.grad_rows.offset(i);
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        std::memset(static_cast<void*>(out), 0, size_t(V) * sizeof(T));
        continue;
      }
      const float g = a.grad_logprobs[i];
      const float gh = kEntropyGrad ? a.grad_entropy[i] : 0.0f;
      const float entropy = kEntropyGrad ? a.entropy[i] : 0.0f;
      const float m = a.saved[2 * i], log2_s = a.saved[2 * i + 1] * kLog2e;
      const int64_t local = label - a.vocab_start;  // the label's column in this tile, if any
      const bool has_label = local >= 0 && local < V;
      const float x_label = has_label ? to_float(x[local]) : 0.0f;  // before an in-place write
      // d_j = -p_j (g + gh (log p_j + H)) / T = p_j (c0 + c1 y_j), y_j = log2 p_j
      const float c0 = -(g + gh * entropy) * pass.inv_t, c1 = -gh * kLn2 * pass.inv_t;
      const vf<W> vm = splat<W>(m), vscale = splat<W>(pass.scale), vlog2_s = splat<W>(log2_s);
      // the gradient of one vector of logits
      auto grad = [&](vf<W> xv) RLK_ALWAYS_INLINE_LAMBDA {
        vf<W> y;
        const vf<W> p = simd::exp2<W>((xv - vm) * vscale - vlog2_s, y);
        return kEntropyGrad ? p * (c0 + c1 * y) : p * c0;
      };
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        int64_t j = b0;
        for (; j + 2 * W <= b0 + n; j += 2 * W) {
          prefetch_step<2 * W>(x + j, kStreamAheadBytes / int64_t(sizeof(T)));
          vf<W> x0, x1;
          simd::load2<W>(x + j, x0, x1);
          simd::store2<W>(out + j, grad(x0), grad(x1));
        }
        for (; j < b0 + n; j += W) {
          prefetch_step<W>(x + j, kStreamAheadBytes / int64_t(sizeof(T)));
          const int64_t left = b0 + n - j;
          const vf<W> d = grad(left >= W ? load<W>(x + j) : load_partial<W>(x + j, left, -INFINITY));
          if (left >= W) store<W>(out + j, d);
          else store_partial<W>(out + j, d, left);
        }
      }
      if (has_label)
        out[local] = simd::from_float<T>(logprobs_grad(x_label, true, m, pass.scale, log2_s, g, gh, entropy, pass.inv_t));
    }
  }
};

void logprobs_backward_run(const LogprobsParams& p, const at::Tensor& /*logits*/) {
  // The backward reads a label's logit only where it falls inside this (tile of the) row.
  check_label_range(INT64_MAX, p, "logprobs_backward");
  if (p.N == 0 || p.V == 0) return;  // nothing to write (and an empty gradient may have no storage)
  run_logits_rows<BackwardRows>(p, p.with_entropy, logits_row_grain(p.V));
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("logprobs", &rlk::logprobs_cpu);
  m.impl("logprobs_backward", &rlk::logprobs_backward_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_op<rlk::logprobs_backward_run>);
  m.impl("logprobs_vocab_tile", &rlk::logprobs_vocab_tile_cpu);
}
