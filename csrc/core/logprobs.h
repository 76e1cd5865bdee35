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
#pragma once
#include <math.h>

#include "common.h"

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
// after the last one; a fifth value, when present, the arg-max flag (below).  A kernel that adds each tile's elements in the order its
// whole-row pass would (tiles of whole kernel blocks) gives that pass's bits.
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

// ---- KL(pi || pi_ref) over the whole vocabulary --------------------------------------------
// Two rows a (logits) and b (ref_logits).  Besides the softmax statistics of each
// (s_a, s_b with their maxima m_a, m_b), the kernels keep the log-ratio sum centred on
// both maxima,
//     w = sum_j 2^{ya_j} d_j,   d_j = ((a_j - m_a) - (b_j - m_b)) / T,
// so that log p_j - log q_j = d_j - ln s_a + ln s_b and
//     KL = w / s_a - ln s_a + ln s_b.
// Centring keeps KL exact where it is small: the raw log-ratio (a_j - b_j) / T can be
// huge (two models' logits differ by an offset, or T is small) while KL is ~0, and its
// rounding would otherwise remain after subtracting (m_a - m_b) / T.  When a maximum
// moves, every d_j moves by the same amount, so w takes s_a times that shift (damped
// by the rescale of s_a when it is the policy's maximum).  A maximum of -inf (nothing
// finite seen yet) centres on 0.  A token with a finite logit (p_j > 0, even where it
// underflows) and a -inf reference logit (q_j = 0) makes w, hence KL, +inf.
struct KlStats {
  float ma, sa, w;  // policy row: max, sum 2^{y}, centred log-ratio sum
  float mb, sb;     // reference row: max, sum 2^{y}
};

RLK_INLINE KlStats kl_stats_empty() { return KlStats{-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f}; }

// The value a row is centred on: its maximum, or 0 while that is -inf.
RLK_INLINE float kl_shift(float m) { return m == -INFINITY ? 0.0f : m; }

// q_j = 0 < p_j: the reference rules out a token the policy can sample.
RLK_INLINE bool kl_ruled_out(float a, float b) { return b == -INFINITY && a > -INFINITY; }

// Larger of two maxima; NaN if either is (NaN poisons the row).
RLK_INLINE float kl_max(float x, float y) { return (x != x || y != y) ? x + y : (x > y ? x : y); }

// Adds one part's statistics (its own maxima) to `out`, whose maxima are final.
RLK_INLINE void kl_stats_add(KlStats& out, const KlStats& part, float scale, float inv_t) {
  if (part.sa != 0.0f) {
    const float c = exp2_f((part.ma - out.ma) * scale);
    const float shift = ((part.ma - out.ma) - (kl_shift(part.mb) - kl_shift(out.mb))) * inv_t;
    out.sa += c * part.sa;
    out.w += part.w == INFINITY ? INFINITY : c * (part.w + part.sa * shift);  // c may underflow to 0
  }
  if (part.sb != 0.0f) out.sb += exp2_f((part.mb - out.mb) * scale) * part.sb;
}

RLK_INLINE KlStats kl_stats_merge(const KlStats& x, const KlStats& y, float scale, float inv_t) {
  KlStats out{kl_max(x.ma, y.ma), 0.0f, 0.0f, kl_max(x.mb, y.mb), 0.0f};
  kl_stats_add(out, x, scale, inv_t);
  kl_stats_add(out, y, scale, inv_t);
  return out;
}

// Adds one pair of logits (the scalar path: CUDA threads, tests).
RLK_INLINE void kl_stats_push(KlStats& st, float a, float b, float scale, float inv_t) {
  const float ma = kl_max(st.ma, a), mb = kl_max(st.mb, b);
  if (ma != st.ma || mb != st.mb) {  // re-centre what came before on the new maxima
    KlStats moved{ma, 0.0f, 0.0f, mb, 0.0f};
    kl_stats_add(moved, st, scale, inv_t);
    st = moved;
  }
  if (st.ma != -INFINITY) {
    const float ea = exp2_f((a - st.ma) * scale);
    st.sa += ea;
    if (kl_ruled_out(a, b)) st.w = INFINITY;
    else if (ea > 0.0f) st.w += ea * (((a - st.ma) - (b - kl_shift(st.mb))) * inv_t);
  }
  if (st.mb != -INFINITY) st.sb += exp2_f((b - st.mb) * scale);
}

// The row's outputs: KL and what the backward needs, [ma, ln s_a, mb, ln s_b, w / s_a].
RLK_INLINE float kl_finish(const KlStats& st, float* saved) {
  const float log_sa = log_f(st.sa), log_sb = log_f(st.sb);
  const float mean_ratio = st.w / st.sa;
  saved[0] = st.ma;
  saved[1] = log_sa;
  saved[2] = st.mb;
  saved[3] = log_sb;
  saved[4] = mean_ratio;
  return mean_ratio - log_sa + log_sb;
}

// dKL/da_j = p_j (log p_j - log q_j - KL) / T = p_j (d_j - w / s_a) / T
// dKL/db_j = (q_j - p_j) / T
RLK_INLINE float kl_grad_logits(float a, float b, const float* saved, float scale, float inv_t, float g) {
  const float p = exp2_f(clamp_floor((a - saved[0]) * scale - saved[1] * kLog2e));
  const float d = ((a - kl_shift(saved[0])) - (b - kl_shift(saved[2]))) * inv_t;
  return p == 0.0f ? 0.0f : g * p * (d - saved[4]) * inv_t;
}

RLK_INLINE float kl_grad_ref_logits(float a, float b, const float* saved, float scale, float inv_t, float g) {
  const float p = exp2_f(clamp_floor((a - saved[0]) * scale - saved[1] * kLog2e));
  const float q = exp2_f(clamp_floor((b - saved[2]) * scale - saved[3] * kLog2e));
  return g * (q - p) * inv_t;
}

}  // namespace rlk
