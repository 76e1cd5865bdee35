// Full-vocabulary KL(pi || pi_ref) from two rows of logits, shared by the CPU
// and CUDA kernels of kl_from_logits (softmax statistics: core/logprobs.h).
#pragma once
#include "logprobs.h"

namespace rlk {

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

// ---- per-chunk statistics (kl_vocab_tile: the vocabulary-parallel exact mode) ----------------
// The chunk rule (core/logprobs.h) for KL: a state of C = vocab_chunks(V) slots a row,
// kKlSlotWidth floats each.  A tile of columns [vocab_start, vocab_start + V') starting on
// a chunk edge writes each of its chunks' statistics, from an empty state, into that
// chunk's slot as (ma, sa, w, mb, sb, 0); tiles may come in any order or from other
// processes.  With finish the C slots are folded in chunk order, as the whole-row kernel
// folds, and the first slot gets (KL, saved[0..4]) (kl_finish).  The sixth value gives the
// finished slot room for KL; the chunks' sixth values carry nothing and need not travel.
constexpr int kKlSlotWidth = 6;

RLK_INLINE void kl_slot_out(float* slot, const KlStats& st) {
  slot[0] = st.ma;
  slot[1] = st.sa;
  slot[2] = st.w;
  slot[3] = st.mb;
  slot[4] = st.sb;
  slot[5] = 0.0f;
}

RLK_INLINE KlStats kl_slot_in(const float* slot) { return KlStats{slot[0], slot[1], slot[2], slot[3], slot[4]}; }

// The arguments of kl_from_logits, its backward and kl_vocab_tile, filled once by
// args/kl_from_logits.h.  saved: 5 floats a row (kl_finish).
struct KlFromLogitsParams {
  Dtype dtype = Dtype::f32;  // of both logits: f32, f16 or bf16
  const void* logits = nullptr;
  RowIndex rows{};
  const void* ref = nullptr;
  RowIndex ref_rows{};
  int64_t N = 0, V = 0;
  const bool* mask = nullptr;  // one flag a row, may be null
  double temperature = 1.0;
  float* kl = nullptr;         // forward output
  float* saved = nullptr;      // forward output, backward input
  // backward: the upstream gradient, and the dense [N, V] gradients wanted (null if not)
  const float* grad_kl = nullptr;
  void* grad_logits = nullptr;
  void* grad_ref = nullptr;
  // kl_vocab_tile: the tile's first column and the rows' slots (chunks a row, kKlSlotWidth each)
  int64_t vocab_start = 0;
  float* state = nullptr;
  int64_t chunks = 0;
  bool finish = false;
  // CUDA forward: blocks per row, and their 5 * N * splits floats of partial statistics
  int splits = 1;
  float* workspace = nullptr;
};

// The CUDA launchers (kl_from_logits.cu).
RLK_CUDA_LAUNCHER(launch_kl_from_logits, KlFromLogitsParams)
RLK_CUDA_LAUNCHER(launch_kl_from_logits_backward, KlFromLogitsParams)

}  // namespace rlk
