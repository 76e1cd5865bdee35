// Log-probs, entropy and full-vocabulary KL from logits on the CPU.
//
// Forward: one streaming pass per row.  The row is read in blocks of kBlock
// elements that stay in L1: a max pass over the block, a rescale of the running
// sums when the maximum grew, then the exp pass (sum-exp and, for entropy, the
// weighted sum, see core/logprobs.h).  Memory traffic is the logits once; no
// [N, V] temporary exists.  Backward: one more pass that recomputes p from the
// saved row statistics and writes the gradient in the logits' dtype, into a
// fresh tensor or into the logits buffer itself.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../args/logprobs.h"
#include "../core/logprobs.h"
#include "../torch_common.h"
#include "simd.h"
#include "simd_loops.h"

namespace rlk {
namespace {

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

int64_t row_grain(int64_t V) { return cpu::row_grain(V, cpu::kElementsPerTask); }

// Max of the first n elements of a block, vectorised.
template <int W, class T>
RLK_ALWAYS_INLINE float block_max(const T* xb, int64_t n) {
  vf<W> mx0 = splat<W>(-INFINITY), mx1 = mx0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    mx0 = vmax<W>(mx0, load<W>(xb + j));
    mx1 = vmax<W>(mx1, load<W>(xb + j + W));
  }
  for (; j + W <= n; j += W) mx0 = vmax<W>(mx0, load<W>(xb + j));
  if (j < n) mx1 = vmax<W>(mx1, load_partial<W>(xb + j, n - j, -INFINITY));
  return hmax<W>(vmax<W>(mx0, mx1));
}

template <int W, class T, bool kEntropy>
RLK_ALWAYS_INLINE SoftmaxStats row_stats(const T* x, int64_t V, float scale, SoftmaxStats st = stats_empty()) {
  const vf<W> vscale = splat<W>(scale);
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
      vf<W> y0, y1;  // the exponents, clamped where e underflows to 0
      const vf<W> e0 = simd::exp2<W>((load<W>(xb + j) - vm) * vscale, y0);
      const vf<W> e1 = simd::exp2<W>((load<W>(xb + j + W) - vm) * vscale, y1);
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

template <class T> struct storage { using type = T; };
template <> struct storage<c10::BFloat16> { using type = simd::bf16; };
template <> struct storage<c10::Half> { using type = simd::fp16; };

// Runs f.template operator()<S>() with S the kernel storage type of `dtype`.
template <class F>
void dispatch_logits(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(simd::bf16{});
    case at::kHalf: return f(simd::fp16{});
    default: TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Labels must lie in [0, V) or be ignore_index (labels already checked for shape):
// the forward reads logits[label].  The tile ops see part of the vocabulary, so they
// pass the end they know (INT64_MAX before the last tile).  One pass over the labels
// before the kernel runs: ops called directly, or traced by torch.compile, get no
// check from the Python layer.
void check_label_range(int64_t V, const at::Tensor& labels, int64_t ignore_index, const char* op) {
  const int64_t* l = labels.data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i)
    TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), op, ": label ", l[i], " at flat index ", i,
                " is outside [0, ", V, ") and is not ignore_index");
}

// ---- logprobs forward -----------------------------------------------------------------------

struct ForwardArgs {
  const void* logits;
  RowIndex rows;
  int64_t V;
  const int64_t* labels;
  int64_t ignore_index;
  float scale, inv_t;
  float* logprobs;
  float* entropy;
  float* saved;
};

template <class T, bool kEntropy>
struct ForwardRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const ForwardArgs& a, int64_t begin, int64_t end) {
    const T* base = static_cast<const T*>(a.logits);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        a.logprobs[i] = 0.0f;
        if (kEntropy) a.entropy[i] = 0.0f;
        a.saved[2 * i] = 0.0f;
        a.saved[2 * i + 1] = 0.0f;
        continue;
      }
      const T* x = base + a.rows.offset(i);
      const SoftmaxStats st = row_stats<W, T, kEntropy>(x, a.V, a.scale);
      const float log_s = std::log(st.s);
      a.logprobs[i] = logprob_of(to_float(x[label]), st.m, log_s, a.inv_t);
      if (kEntropy) a.entropy[i] = entropy_of(st);
      a.saved[2 * i] = st.m;
      a.saved[2 * i + 1] = log_s;
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                            double temperature, int64_t ignore_index,
                                                            bool with_entropy, bool /*inplace_backward*/) {
  at::Tensor logprobs, entropy, saved;
  std::tie(logprobs, entropy, saved) = logprobs_outputs(logits, labels, temperature, with_entropy);
  check_label_range(logits.size(-1), labels, ignore_index, "logprobs");
  RowIndex rows;
  const at::Tensor x = rows_readable(logits, &rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  ForwardArgs args{x.data_ptr(), rows, V, labels.data_ptr<int64_t>(), ignore_index,
                   float(kLog2e / temperature), float(1.0 / temperature), logprobs.data_ptr<float>(),
                   with_entropy ? entropy.data_ptr<float>() : nullptr, saved.data_ptr<float>()};
  dispatch_logits(x.scalar_type(), "logprobs", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      if (with_entropy) simd::run_simd<ForwardRows<T, true>>(args, begin, end);
      else simd::run_simd<ForwardRows<T, false>>(args, begin, end);
    });
  });
  return {logprobs, entropy, saved};
}

// ---- one vocabulary tile of rows (linear_logprobs) ---------------------------------------------

struct TileArgs {
  const void* logits;
  RowIndex rows;
  int64_t V;
  const int64_t* labels;
  int64_t ignore_index, vocab_start;
  float scale, inv_t;
  float* state;
  int width;  // kTileWidth, or kTileWidthTop1 with the arg-max flag
  bool finish;
};

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
  static RLK_ALWAYS_INLINE void run(const TileArgs& a, int64_t begin, int64_t end) {
    const T* base = static_cast<const T*>(a.logits);
    for (int64_t i = begin; i < end; ++i) {
      float* state = a.state + a.width * i;
      const int64_t label = a.labels[i];
      if (label == a.ignore_index) {
        tile_stats_ignored(state, a.width);
        continue;
      }
      const T* x = base + a.rows.offset(i);
      const SoftmaxStats before = tile_stats_in(state, a.vocab_start);
      // kBlock-aligned tiles continue the whole-row pass exactly (row_stats' blocks)
      const SoftmaxStats st = row_stats<W, T, kEntropy>(x, a.V, a.scale, before);
      const int64_t local = label - a.vocab_start;
      const bool label_here = local >= 0 && local < a.V;
      const float x_label = label_here ? to_float(x[local]) : tile_label_in(state, a.vocab_start);
      float top1 = 0.0f;
      if (a.width == kTileWidthTop1) {
        // the scan of the columns before the label runs only when the label's logit is the largest so far
        const bool earlier = label_here && top1_candidate(x_label, st.m) && any_at_least(x, local, x_label);
        top1 = tile_top1_next(tile_top1_in(state, a.vocab_start), label_here, x_label, before.m, st.m, earlier);
      }
      tile_stats_out<kEntropy>(state, st, x_label, a.finish, a.inv_t);
      if (a.width == kTileWidthTop1) state[4] = top1;
    }
  }
};

void logprobs_vocab_tile_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& state,
                             double temperature, int64_t ignore_index, int64_t vocab_start, bool with_entropy,
                             bool finish) {
  const int width = check_vocab_tile(logits, labels, state, temperature, vocab_start);
  check_label_range(finish ? vocab_start + logits.size(-1) : INT64_MAX, labels, ignore_index, "logprobs_vocab_tile");
  RowIndex rows;
  const at::Tensor x = rows_readable(logits, &rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  TileArgs args{x.data_ptr(), rows, V, labels.data_ptr<int64_t>(), ignore_index, vocab_start,
                float(kLog2e / temperature), float(1.0 / temperature), state.data_ptr<float>(), width, finish};
  dispatch_logits(x.scalar_type(), "logprobs_vocab_tile", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      if (with_entropy) simd::run_simd<TileRows<T, true>>(args, begin, end);
      else simd::run_simd<TileRows<T, false>>(args, begin, end);
    });
  });
}

// ---- logprobs backward ----------------------------------------------------------------------

struct BackwardArgs {
  const void* logits;
  RowIndex rows;
  void* grad;
  RowIndex grad_rows;
  int64_t V;
  const int64_t* labels;
  int64_t ignore_index;
  int64_t vocab_start;
  const float* grad_logprobs;
  const float* grad_entropy;
  const float* entropy;
  const float* saved;
  float scale, inv_t;
};

template <class T, bool kEntropyGrad>
struct BackwardRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const BackwardArgs& a, int64_t begin, int64_t end) {
    const T* base = static_cast<const T*>(a.logits);
    T* grad_base = static_cast<T*>(a.grad);
    const int64_t V = a.V;
    for (int64_t i = begin; i < end; ++i) {
      const T* x = base + a.rows.offset(i);
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
      const float c0 = -(g + gh * entropy) * a.inv_t, c1 = -gh * kLn2 * a.inv_t;
      const vf<W> vm = splat<W>(m), vscale = splat<W>(a.scale), vlog2_s = splat<W>(log2_s);
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        int64_t j = b0;
        for (; j < b0 + n; j += W) {
          prefetch_step<W>(x + j, kStreamAheadBytes / int64_t(sizeof(T)));
          const int64_t left = b0 + n - j;
          const vf<W> xv = left >= W ? load<W>(x + j) : load_partial<W>(x + j, left, -INFINITY);
          vf<W> y;
          const vf<W> p = simd::exp2<W>((xv - vm) * vscale - vlog2_s, y);
          const vf<W> d = kEntropyGrad ? p * (c0 + c1 * y) : p * c0;
          if (left >= W) store<W>(out + j, d);
          else store_partial<W>(out + j, d, left);
        }
      }
      if (has_label)
        out[local] = simd::from_float<T>(logprobs_grad(x_label, true, m, a.scale, log2_s, g, gh, entropy, a.inv_t));
    }
  }
};

void logprobs_backward_into(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                            const at::Tensor& entropy, double temperature, int64_t ignore_index,
                            int64_t vocab_start, const at::Tensor& grad) {
  // The backward reads a label's logit only where it falls inside this (tile of the) row.
  check_logprobs_backward(grad_logprobs, grad_entropy, logits, labels, saved, entropy, vocab_start);
  check_label_range(INT64_MAX, labels, ignore_index, "logprobs_backward");
  const bool with_entropy = grad_entropy.has_value();
  RowIndex rows, grad_rows;
  const at::Tensor x = rows_readable(logits, &rows);
  TORCH_CHECK(row_index_of(grad, &grad_rows), "internal: gradient without a row layout");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "internal: gradient dtype");
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  if (N == 0 || V == 0) return;  // nothing to write (and an empty gradient may have no storage)
  BackwardArgs args{x.data_ptr(), rows, grad.data_ptr(), grad_rows, V, labels.data_ptr<int64_t>(), ignore_index,
                    vocab_start, grad_logprobs.data_ptr<float>(), with_entropy ? grad_entropy->data_ptr<float>() : nullptr,
                    with_entropy ? entropy.data_ptr<float>() : nullptr, saved.data_ptr<float>(),
                    float(kLog2e / temperature), float(1.0 / temperature)};
  dispatch_logits(x.scalar_type(), "logprobs_backward", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      if (with_entropy) simd::run_simd<BackwardRows<T, true>>(args, begin, end);
      else simd::run_simd<BackwardRows<T, false>>(args, begin, end);
    });
  });
}

at::Tensor logprobs_backward_cpu(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                 const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                 const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                 int64_t vocab_start) {
  return logprobs_grad_fresh(logits, [&](const at::Tensor& grad) {
    logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start, grad);
  });
}

void logprobs_backward_inplace_cpu(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& saved,
                                   const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                   int64_t vocab_start) {
  logprobs_grad_inplace(logits, [&](const at::Tensor& grad) {
    logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, saved, entropy, temperature, ignore_index,
                           vocab_start, grad);
  });
}

// ---- KL(pi || pi_ref) from logits -----------------------------------------------------------

struct KlArgs {
  const void* logits;
  RowIndex rows;
  const void* ref;
  RowIndex ref_rows;
  int64_t V;
  const bool* mask;
  float scale, inv_t;
  float* kl;
  float* saved;
};

template <class T>
struct KlRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const KlArgs& a, int64_t begin, int64_t end) {
    const T* a_base = static_cast<const T*>(a.logits);
    const T* b_base = static_cast<const T*>(a.ref);
    const int64_t V = a.V;
    const vf<W> vscale = splat<W>(a.scale), vinv_t = splat<W>(a.inv_t), zero = splat<W>(0.0f);
    const vf<W> vinf = splat<W>(INFINITY), vminus_inf = splat<W>(-INFINITY);
    for (int64_t i = begin; i < end; ++i) {
      float* saved = a.saved + 5 * i;
      if (a.mask != nullptr && !a.mask[i]) {
        a.kl[i] = 0.0f;
        for (int k = 0; k < 5; ++k) saved[k] = 0.0f;
        continue;
      }
      const T* xa = a_base + a.rows.offset(i);
      const T* xb = b_base + a.ref_rows.offset(i);
      KlStats st = kl_stats_empty();
      for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
        const int64_t n = std::min(kBlock, V - b0);
        // a block that raises a maximum re-centres the sums so far (core/logprobs.h)
        st = kl_stats_merge(st, KlStats{block_max<W>(xa + b0, n), 0.0f, 0.0f, block_max<W>(xb + b0, n), 0.0f},
                            a.scale, a.inv_t);
        const vf<W> vma = splat<W>(kl_shift(st.ma));
        const vf<W> vmb = splat<W>(kl_shift(st.mb));
        vf<W> sa = zero, sb = zero, w = zero;
        for (int64_t j = b0; j < b0 + n; j += W) {
          prefetch_step<W>(xa + j, n);  // the next blocks, for their max passes
          prefetch_step<W>(xb + j, n);
          const int64_t left = b0 + n - j;
          const vf<W> va = left >= W ? load<W>(xa + j) : load_partial<W>(xa + j, left, -INFINITY);
          const vf<W> vb = left >= W ? load<W>(xb + j) : load_partial<W>(xb + j, left, -INFINITY);
          const vf<W> ea = simd::exp2<W>((va - vma) * vscale);
          const vf<W> eb = simd::exp2<W>((vb - vmb) * vscale);
          sa += ea;
          sb += eb;
          // p_j = 0 adds nothing (also where a_j = -inf makes the log-ratio NaN); q_j = 0 < p_j
          // (however small p_j) makes KL inf
          const vf<W> term = ea == 0.0f ? zero : ea * (((va - vma) - (vb - vmb)) * vinv_t);
          w += (vb == vminus_inf) & (va > vminus_inf) ? vinf : term;
        }
        st.sa += hsum<W>(sa);
        st.sb += hsum<W>(sb);
        st.w += hsum<W>(w);
      }
      a.kl[i] = kl_finish(st, saved);
    }
  }
};

struct KlBackwardArgs {
  const void* logits;
  RowIndex rows;
  const void* ref;
  RowIndex ref_rows;
  int64_t V;
  const bool* mask;
  const float* grad_kl;
  const float* saved;
  float scale, inv_t;
  void* grad_logits;  // dense rows or null
  void* grad_ref;     // dense rows or null
};

template <class T>
struct KlBackwardRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const KlBackwardArgs& a, int64_t begin, int64_t end) {
    const T* a_base = static_cast<const T*>(a.logits);
    const T* b_base = static_cast<const T*>(a.ref);
    const int64_t V = a.V;
    const vf<W> vscale = splat<W>(a.scale), vinv_t = splat<W>(a.inv_t), zero = splat<W>(0.0f);
    for (int64_t i = begin; i < end; ++i) {
      T* ga = a.grad_logits ? static_cast<T*>(a.grad_logits) + i * V : nullptr;
      T* gb = a.grad_ref ? static_cast<T*>(a.grad_ref) + i * V : nullptr;
      const float g = a.grad_kl[i];
      if ((a.mask != nullptr && !a.mask[i])) {
        if (ga) std::memset(static_cast<void*>(ga), 0, size_t(V) * sizeof(T));
        if (gb) std::memset(static_cast<void*>(gb), 0, size_t(V) * sizeof(T));
        continue;
      }
      const float* saved = a.saved + 5 * i;
      const T* xa = a_base + a.rows.offset(i);
      const T* xb = b_base + a.ref_rows.offset(i);
      const vf<W> vma = splat<W>(saved[0]), vla = splat<W>(saved[1] * kLog2e);
      const vf<W> vmb = splat<W>(saved[2]), vlb = splat<W>(saved[3] * kLog2e);
      const vf<W> va_shift = splat<W>(kl_shift(saved[0])), vb_shift = splat<W>(kl_shift(saved[2]));
      const vf<W> vmean = splat<W>(saved[4]), vg_t = splat<W>(g * a.inv_t);
      for (int64_t j = 0; j < V; j += W) {
        prefetch_step<W>(xa + j, kStreamAheadBytes / int64_t(sizeof(T)));
        prefetch_step<W>(xb + j, kStreamAheadBytes / int64_t(sizeof(T)));
        const int64_t left = V - j;
        const vf<W> va = left >= W ? load<W>(xa + j) : load_partial<W>(xa + j, left, -INFINITY);
        const vf<W> vb = left >= W ? load<W>(xb + j) : load_partial<W>(xb + j, left, -INFINITY);
        const vf<W> p = simd::exp2<W>((va - vma) * vscale - vla);
        if (ga) {
          const vf<W> d = p == 0.0f ? zero : vg_t * p * (((va - va_shift) - (vb - vb_shift)) * vinv_t - vmean);
          if (left >= W) store<W>(ga + j, d);
          else store_partial<W>(ga + j, d, left);
        }
        if (gb) {
          const vf<W> q = simd::exp2<W>((vb - vmb) * vscale - vlb);
          const vf<W> d = vg_t * (q - p);
          if (left >= W) store<W>(gb + j, d);
          else store_partial<W>(gb + j, d, left);
        }
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cpu(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                      const c10::optional<at::Tensor>& mask, double temperature) {
  at::Tensor kl, saved;
  std::tie(kl, saved) = kl_outputs(logits, ref_logits, temperature);
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  KlArgs args{a.data_ptr(), rows, b.data_ptr(), ref_rows, V, optional_row_mask(mask, logits),
              float(kLog2e / temperature), float(1.0 / temperature), kl.data_ptr<float>(), saved.data_ptr<float>()};
  dispatch_logits(a.scalar_type(), "kl_from_logits", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
      simd::run_simd<KlRows<T>>(args, begin, end);
    });
  });
  return {kl, saved};
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                               const at::Tensor& ref_logits,
                                                               const c10::optional<at::Tensor>& mask,
                                                               const at::Tensor& saved, double temperature,
                                                               bool logits_grad, bool ref_grad) {
  at::Tensor ga, gb;
  std::tie(ga, gb) = kl_grad_outputs(grad_kl, logits, ref_logits, saved, logits_grad, ref_grad);
  RowIndex rows, ref_rows;
  const at::Tensor a = rows_readable(logits, &rows), b = rows_readable(ref_logits, &ref_rows);
  const int64_t N = leading_numel(logits), V = logits.size(-1);
  KlBackwardArgs args{a.data_ptr(), rows, b.data_ptr(), ref_rows, V, optional_row_mask(mask, logits),
                      grad_kl.data_ptr<float>(), saved.data_ptr<float>(), float(kLog2e / temperature),
                      float(1.0 / temperature), logits_grad ? ga.data_ptr() : nullptr,
                      ref_grad ? gb.data_ptr() : nullptr};
  if (logits_grad || ref_grad) {
    dispatch_logits(a.scalar_type(), "kl_from_logits_backward", [&](auto tag) {
      using T = decltype(tag);
      at::parallel_for(0, N, row_grain(2 * V), [&](int64_t begin, int64_t end) {
        simd::run_simd<KlBackwardRows<T>>(args, begin, end);
      });
    });
  }
  return {ga, gb};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("logprobs", &rlk::logprobs_cpu);
  m.impl("logprobs_backward", &rlk::logprobs_backward_cpu);
  m.impl("logprobs_backward_inplace", &rlk::logprobs_backward_inplace_cpu);
  m.impl("logprobs_vocab_tile", &rlk::logprobs_vocab_tile_cpu);
  m.impl("kl_from_logits", &rlk::kl_from_logits_cpu);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cpu);
}
