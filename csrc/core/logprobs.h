// Per-row softmax statistics for log-probs, entropy and full-vocabulary KL,
// shared by the CPU and CUDA kernels.
//
// A row x_0..x_{V-1} of raw logits is read once.  With scale = log2(e) / T
// and m the largest raw logit seen so far, the kernels keep
//     s = sum_j 2^{y_j},   t = sum_j y_j 2^{y_j},   y_j = (x_j - m) * scale,
// i.e. exp and its argument in base 2 (one multiply per element).  Then with
// ln s the natural log of s,
//     log p_j = (x_j - m) / T - ln s,   H = -sum_j p_j log p_j = ln s - ln2 * t / s.
// Differences x_j - m are formed on raw logits before scaling, so logits of
// magnitude 1e4 keep their float32 precision in the result.  Elements with
// x_j = -inf contribute 0 to s and t (never 0 * inf).
//
// Partial statistics of one row (vector lanes, CUDA threads, blocks of a split
// row) merge with stats_merge.
//
// The chunk rule (every backend): a row is reduced as ceil(V / kVocabChunk) chunks
// of kVocabChunk columns (the last one shorter), each chunk's statistics computed
// from an empty state, then folded in chunk order in float32: acc = stats_merge(acc,
// chunk), acc starting empty.  How a backend reduces inside a chunk is its own, but the
// same values must give the same bits wherever the chunk sits (its row, its batch, its
// address).  Rows cut on chunk edges (vocabulary tiles, vocabulary-parallel shards)
// then give the whole row's bits by folding their chunks' statistics in order.
#pragma once
#include <math.h>

#include "common.h"
#include "rows.h"

namespace rlk {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// exp2 of anything below this underflows to 0 in float32: arguments are clamped
// here so that y * 2^y stays 0 instead of NaN at y = -inf.
constexpr float kExp2Floor = -160.0f;

RLK_INLINE float exp2_f(float y) { return exp2f(y); }
// Lower clamp that lets NaN through (fmaxf would drop it).
RLK_INLINE float clamp_floor(float y) { return y < kExp2Floor ? kExp2Floor : y; }
RLK_INLINE float log_f(float x) { return logf(x); }

struct SoftmaxStats {
  float m;  // largest raw logit
  float s;  // sum 2^{y_j}
  float t;  // sum y_j 2^{y_j} (only when entropy is wanted)
};

RLK_INLINE SoftmaxStats stats_empty() { return SoftmaxStats{-INFINITY, 0.0f, 0.0f}; }

// Adds one raw logit to running statistics (the scalar path: tails, CUDA threads).
template <bool kEntropy>
RLK_INLINE void stats_push(SoftmaxStats& st, float x, float scale) {
  if (x > st.m) {  // a new maximum rescales what came before
    if (st.m != -INFINITY) {
      const float dy = (st.m - x) * scale;
      const float c = exp2_f(dy);
      if (kEntropy) st.t = c * (st.t + dy * st.s);
      st.s *= c;
    }
    st.m = x;
  }
  if (x != x) st.m = x;  // NaN poisons the row, as it does in log_softmax
  if (st.m == -INFINITY) return;
  const float y = clamp_floor((x - st.m) * scale);
  const float e = exp2_f(y);
  st.s += e;
  if (kEntropy) st.t += e * y;
}

constexpr int64_t kVocabChunk = 8192;

RLK_INLINE int64_t vocab_chunks(int64_t V) { return (V + kVocabChunk - 1) / kVocabChunk; }

template <bool kEntropy>
RLK_INLINE SoftmaxStats stats_merge(SoftmaxStats a, SoftmaxStats b, float scale) {
  if (b.m > a.m) {
    const SoftmaxStats tmp = a;
    a = b;
    b = tmp;
  }
  if (b.m != b.m) return b;  // NaN
  if (b.m == -INFINITY) return a;
  const float dy = (b.m - a.m) * scale;
  const float c = exp2_f(dy);
  a.s += c * b.s;
  if (kEntropy) a.t += c * (b.t + dy * b.s);
  return a;
}

RLK_INLINE float entropy_of(const SoftmaxStats& st) { return log_f(st.s) - kLn2 * st.t / st.s; }

RLK_INLINE float logprob_of(float x_label, float m, float log_s, float inv_t) {
  return (x_label - m) * inv_t - log_s;
}

// ---- a row streamed in vocabulary tiles (linear_logprobs) ---------------------------------------
// The lm-head's logits of a token arrive as tiles of columns [v0, v0 + n).  A float32
// state of 4 values per row carries (m, s, t, label logit) from tile to tile, the
// first tile (v0 = 0) starting from nothing, and holds (log p(label), H, m, ln s)
// after the last one; a fifth value, when present, the arg-max flag (below).  A tile folds
// its own chunks (counted from the tile's first column) into the state, so tiles that
// start on chunk edges give the whole-row pass's bits.
RLK_INLINE SoftmaxStats tile_stats_in(const float* state, int64_t vocab_start) {
  return vocab_start == 0 ? stats_empty() : SoftmaxStats{state[0], state[1], state[2]};
}

RLK_INLINE float tile_label_in(const float* state, int64_t vocab_start) { return vocab_start == 0 ? 0.0f : state[3]; }

// A label that no tile of the row can hold: negative, or, at the last tile (which
// ends the vocabulary at vocab_end), at or past that end.  Its log-prob is NaN.
RLK_INLINE bool tile_label_lost(int64_t label, int64_t vocab_end, bool finish) {
  return label < 0 || (finish && label >= vocab_end);
}

template <bool kEntropy>
RLK_INLINE void tile_stats_out(float* state, const SoftmaxStats& st, float x_label, bool finish, float inv_t) {
  if (!finish) {
    state[0] = st.m;
    state[1] = st.s;
    state[2] = kEntropy ? st.t : 0.0f;
    state[3] = x_label;
    return;
  }
  const float log_s = log_f(st.s);
  state[0] = logprob_of(x_label, st.m, log_s, inv_t);
  state[1] = kEntropy ? entropy_of(st) : 0.0f;
  state[2] = st.m;
  state[3] = log_s;
}

// Chunk-state mode (the state shaped [..., C, 4]: one state per chunk of the row, C =
// vocab_chunks(V)).  A tile starting on a chunk edge writes each of its chunks'
// statistics, from an empty state, into that chunk's slot, (m, s, t, label logit or 0
// where the label lies elsewhere); tiles may come in any order, or from other processes
// (the vocabulary-parallel exact mode gathers them).  With finish the slots are folded
// in chunk order, as the whole-row kernel folds, and the first slot gets the finished
// (log p(label), H, m, ln s).  A tile of width 0 at vocab_start = V only folds.
RLK_INLINE int64_t chunk_of(int64_t column) { return column / kVocabChunk; }

// A row whose label is ignore_index: 0 everywhere, as the whole-row forward writes.
RLK_INLINE void tile_stats_ignored(float* state, int width = 4) {
  for (int k = 0; k < width; ++k) state[k] = 0.0f;
}

// Whether the label is the row's arg-max (TRL's is_top1), tracked with a fifth state
// value per row: 1 while the label is the first arg-max of the columns seen so far (as
// argmax, an earlier equal logit wins the tie), 0 otherwise, so after the last tile it
// is the answer for the whole row.  In the label's tile the label's logit must be the
// largest so far (m includes this tile), above every earlier tile's (prev_m), with no
// earlier column of its own tile reaching it (earlier_at_least, which the kernel only
// needs to look for when the first test passes); in later tiles it stays 1 while no
// logit exceeds it.  A NaN logit anywhere in the row makes m NaN, hence 0.
constexpr int kTileWidth = 4;      // state values per row
constexpr int kTileWidthTop1 = 5;  // ... with the arg-max flag

RLK_INLINE float tile_top1_in(const float* state, int64_t vocab_start) { return vocab_start == 0 ? 0.0f : state[4]; }

RLK_INLINE bool top1_candidate(float x_label, float m) { return x_label >= m; }

RLK_INLINE float tile_top1_next(float flag_in, bool label_here, float x_label, float prev_m, float m,
                                bool earlier_at_least) {
  const bool top = top1_candidate(x_label, m) &&
                   (label_here ? (prev_m < x_label && !earlier_at_least) : flag_in != 0.0f);
  return top ? 1.0f : 0.0f;
}

// The gradient of one logit.  g: upstream gradient of log p_label, gh: of H.
//   dlogits_j = (g * (onehot_j - p_j) - gh * p_j * (log p_j + H)) / T
// With y = log2 p_j clamped at kExp2Floor, p_j = 0 contributes exactly 0.
RLK_INLINE float logprobs_grad(float x, bool is_label, float m, float scale, float log2_s,
                               float g, float gh, float entropy, float inv_t) {
  const float y = clamp_floor((x - m) * scale - log2_s);
  const float p = exp2_f(y);
  const float d = (is_label ? g : 0.0f) - p * (g + gh * (y * kLn2 + entropy));
  return d * inv_t;
}

// softmax's base-2 scale log2(e) / T and 1 / T, in float32 (every backend).
RLK_INLINE float log2_scale(double temperature) { return float(kLog2e / temperature); }
RLK_INLINE float inv_temperature(double temperature) { return float(1.0 / temperature); }

// The arguments of logprobs, logprobs_vocab_tile and logprobs_backward, filled
// once by args/logprobs.h (the fields an op does not use keep their defaults).
// Logits rows may be strided (RowIndex); the float arrays are contiguous, one
// value a row (`width` for state, 2 for saved).
struct LogprobsParams {
  Dtype dtype = Dtype::f32;  // of logits and grad: f32, f16 or bf16
  const void* logits = nullptr;
  RowIndex rows{};
  int64_t N = 0, V = 0;      // rows, and columns in this call (a tile's width for the tile ops)
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  int64_t vocab_start = 0;   // the logits' first column inside the whole row
  double temperature = 1.0;
  bool with_entropy = false;
  // forward outputs (entropy null without it); the backward reads entropy and saved
  float* logprobs = nullptr;
  float* entropy = nullptr;
  float* saved = nullptr;    // (max, log-sum-exp) per row
  // logprobs_vocab_tile
  float* state = nullptr;
  int width = kTileWidth;
  bool finish = false;
  int64_t chunks = 0;        // chunk-state mode: the state's chunks per row (0: a running state)
  // backward: grad may alias logits; grad_entropy is null without the entropy term
  void* grad = nullptr;
  RowIndex grad_rows{};
  const float* grad_logprobs = nullptr;
  const float* grad_entropy = nullptr;
  // CUDA forward: chunks per row (ceil(V / kVocabChunk)), and their 3 * N * splits floats of
  // partial statistics when there is more than one
  int splits = 1;
  float* workspace = nullptr;
};

// The CUDA launchers (logprobs.cu).
RLK_CUDA_LAUNCHER(launch_logprobs_forward, LogprobsParams)
RLK_CUDA_LAUNCHER(launch_logprobs_vocab_tile, LogprobsParams)
RLK_CUDA_LAUNCHER(launch_logprobs_backward, LogprobsParams)

}  // namespace rlk
