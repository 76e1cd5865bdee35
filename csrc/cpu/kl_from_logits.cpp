// Full-vocabulary KL(pi || pi_ref) from two rows of logits on the CPU, and its
// backward: the streaming block passes of cpu/logprobs.cpp over both rows at
// once, chunks folded in order as there (statistics: core/kl_from_logits.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../args/kl_from_logits.h"
#include "../core/kl_from_logits.h"
#include "logits.h"

namespace rlk {
namespace {

// the SIMD layer and the row-pass helpers of logits.h
using namespace cpu;

// What both KL passes read first: the two rows' bases and softmax's scales,
// also as vectors.
template <int W, class T>
struct KlPass : LogitsPass<T> {
  const T* ref_base;
  vf<W> vscale, vinv_t, zero;

  RLK_ALWAYS_INLINE explicit KlPass(const KlFromLogitsParams& p)
      : LogitsPass<T>(p), ref_base(static_cast<const T*>(p.ref)), vscale(splat<W>(this->scale)),
        vinv_t(splat<W>(this->inv_t)), zero(splat<W>(0.0f)) {}
};

// The statistics of one chunk (n <= kVocabChunk pairs of logits) from an empty
// state, in kBlock-wide blocks; element j of the chunk goes to a lane fixed by j % (2 W)
// and the dtype (simd::load2) wherever the chunk lies in memory.
template <int W, class T>
RLK_ALWAYS_INLINE KlStats kl_chunk(const KlPass<W, T>& pass, const T* xa, const T* xb, int64_t V) {
  const vf<W> vscale = pass.vscale, vinv_t = pass.vinv_t, zero = pass.zero;
  const vf<W> vinf = splat<W>(INFINITY), vminus_inf = splat<W>(-INFINITY);
  KlStats st = kl_stats_empty();
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    // a block that raises a maximum re-centres the sums so far (core/kl_from_logits.h)
    st = kl_stats_merge(st, KlStats{block_max<W>(xa + b0, n), 0.0f, 0.0f, block_max<W>(xb + b0, n), 0.0f},
                        pass.scale, pass.inv_t);
    const vf<W> vma = splat<W>(kl_shift(st.ma));
    const vf<W> vmb = splat<W>(kl_shift(st.mb));
    vf<W> sa = zero, sb = zero, w = zero;
    auto add = [&](vf<W> va, vf<W> vb) RLK_ALWAYS_INLINE_LAMBDA {
      const vf<W> ea = simd::exp2<W>((va - vma) * vscale);
      const vf<W> eb = simd::exp2<W>((vb - vmb) * vscale);
      sa += ea;
      sb += eb;
      // p_j = 0 adds nothing (also where a_j = -inf makes the log-ratio NaN); q_j = 0 < p_j
      // (however small p_j) makes KL inf
      const vf<W> term = ea == 0.0f ? zero : ea * (((va - vma) - (vb - vmb)) * vinv_t);
      // That is b_j == -inf and a_j > -inf, found with one mask at a time: key is -inf where
      // a_j > -inf and +inf elsewhere; (key > b_j ? key : b_j) is b_j where key is -inf, and
      // +inf, or b_j = +inf or NaN, where it is +inf, so it is -inf exactly where KL is inf.
      // (GCC 12 turns two vector masks combined, m1 & m2 or selects nested on two masks, in
      // these per-ISA copies into one scalar compare an element.)
      const vf<W> key = va > vminus_inf ? vminus_inf : vinf;
      const vf<W> kl_inf = key > vb ? key : vb;
      w += kl_inf == vminus_inf ? vinf : term;
    };
    int64_t j = b0;
    for (; j + 2 * W <= b0 + n; j += 2 * W) {
      prefetch_step<2 * W>(xa + j, n);  // the next blocks, for their max passes
      prefetch_step<2 * W>(xb + j, n);
      vf<W> va0, va1, vb0, vb1;
      simd::load2<W>(xa + j, va0, va1);
      simd::load2<W>(xb + j, vb0, vb1);
      add(va0, vb0);
      add(va1, vb1);
    }
    for (; j < b0 + n; j += W) {
      const int64_t left = b0 + n - j;
      add(left >= W ? load<W>(xa + j) : load_partial<W>(xa + j, left, -INFINITY),
          left >= W ? load<W>(xb + j) : load_partial<W>(xb + j, left, -INFINITY));
    }
    st.sa += hsum<W>(sa);
    st.sb += hsum<W>(sb);
    st.w += hsum<W>(w);
  }
  return st;
}

// The chunk rule's fold step for KL (core/logprobs.h), compiled once outside the
// per-ISA copies, as cpu/logits.h's fold_chunk and for the same reason.
__attribute__((noinline)) KlStats fold_kl_chunk(KlStats acc, KlStats chunk, float scale, float inv_t) {
  return kl_stats_merge(acc, chunk, scale, inv_t);
}

// The forward of row i: its KL and the five saved statistics, chunks folded in order.
template <int W, class T>
RLK_ALWAYS_INLINE void kl_row(const KlFromLogitsParams& a, const KlPass<W, T>& pass, int64_t i) {
  float* saved = a.saved + 5 * i;
  if (a.mask != nullptr && !a.mask[i]) {
    a.kl[i] = 0.0f;
    for (int k = 0; k < 5; ++k) saved[k] = 0.0f;
    return;
  }
  const T* xa = pass.base + a.rows.offset(i);
  const T* xb = pass.ref_base + a.ref_rows.offset(i);
  KlStats st = kl_stats_empty();
  for (int64_t c0 = 0; c0 < a.V; c0 += kVocabChunk)
    st = fold_kl_chunk(st, kl_chunk<W, T>(pass, xa + c0, xb + c0, std::min(kVocabChunk, a.V - c0)), pass.scale,
                       pass.inv_t);
  a.kl[i] = kl_finish(st, saved);
}

// The backward of row i: the gradients wanted, dense rows of V.
template <int W, class T>
RLK_ALWAYS_INLINE void kl_grad_row(const KlFromLogitsParams& a, const KlPass<W, T>& pass, int64_t i) {
  const int64_t V = a.V;
  const vf<W> vscale = pass.vscale, vinv_t = pass.vinv_t, zero = pass.zero;
  T* ga = a.grad_logits ? static_cast<T*>(a.grad_logits) + i * V : nullptr;
  T* gb = a.grad_ref ? static_cast<T*>(a.grad_ref) + i * V : nullptr;
  const float g = a.grad_kl[i];
  if ((a.mask != nullptr && !a.mask[i])) {
    if (ga) std::memset(static_cast<void*>(ga), 0, size_t(V) * sizeof(T));
    if (gb) std::memset(static_cast<void*>(gb), 0, size_t(V) * sizeof(T));
    return;
  }
  const float* saved = a.saved + 5 * i;
  const T* xa = pass.base + a.rows.offset(i);
  const T* xb = pass.ref_base + a.ref_rows.offset(i);
  const vf<W> vma = splat<W>(saved[0]), vla = splat<W>(saved[1] * kLog2e);
  const vf<W> vmb = splat<W>(saved[2]), vlb = splat<W>(saved[3] * kLog2e);
  const vf<W> va_shift = splat<W>(kl_shift(saved[0])), vb_shift = splat<W>(kl_shift(saved[2]));
  const vf<W> vmean = splat<W>(saved[4]), vg_t = splat<W>(g * pass.inv_t);
  // the gradients of one vector of logit pairs (p, and q where wanted, from the saved statistics)
  auto grad_a = [&](vf<W> va, vf<W> vb, vf<W> p) RLK_ALWAYS_INLINE_LAMBDA {
    return p == 0.0f ? zero : vg_t * p * (((va - va_shift) - (vb - vb_shift)) * vinv_t - vmean);
  };
  auto grad_b = [&](vf<W> vb, vf<W> p) RLK_ALWAYS_INLINE_LAMBDA {
    return vg_t * (simd::exp2<W>((vb - vmb) * vscale - vlb) - p);
  };
  int64_t j = 0;
  for (; j + 2 * W <= V; j += 2 * W) {
    prefetch_step<2 * W>(xa + j, kStreamAheadBytes / int64_t(sizeof(T)));
    prefetch_step<2 * W>(xb + j, kStreamAheadBytes / int64_t(sizeof(T)));
    vf<W> va0, va1, vb0, vb1;
    simd::load2<W>(xa + j, va0, va1);
    simd::load2<W>(xb + j, vb0, vb1);
    const vf<W> p0 = simd::exp2<W>((va0 - vma) * vscale - vla);
    const vf<W> p1 = simd::exp2<W>((va1 - vma) * vscale - vla);
    if (ga) simd::store2<W>(ga + j, grad_a(va0, vb0, p0), grad_a(va1, vb1, p1));
    if (gb) simd::store2<W>(gb + j, grad_b(vb0, p0), grad_b(vb1, p1));
  }
  for (; j < V; j += W) {
    const int64_t left = V - j;
    const vf<W> va = left >= W ? load<W>(xa + j) : load_partial<W>(xa + j, left, -INFINITY);
    const vf<W> vb = left >= W ? load<W>(xb + j) : load_partial<W>(xb + j, left, -INFINITY);
    const vf<W> p = simd::exp2<W>((va - vma) * vscale - vla);
    if (ga) {
      if (left >= W) store<W>(ga + j, grad_a(va, vb, p));
      else store_partial<W>(ga + j, grad_a(va, vb, p), left);
    }
    if (gb) {
      if (left >= W) store<W>(gb + j, grad_b(vb, p));
      else store_partial<W>(gb + j, grad_b(vb, p), left);
    }
  }
}

template <class T, bool kBackward>
struct KlRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const KlFromLogitsParams& a, int64_t begin, int64_t end) {
    const KlPass<W, T> pass(a);
    for (int64_t i = begin; i < end; ++i) {
      if (kBackward) kl_grad_row<W, T>(a, pass, i);
      else kl_row<W, T>(a, pass, i);
    }
  }
};

// kl_vocab_tile (core/kl_from_logits.h): each chunk of the tile into its slot, by the
// whole-row kernel's kl_chunk; with finish, the fold of the row's slots in chunk order
// by the same fold_kl_chunk, and the same kl_finish.
template <class T, bool kUnused>
struct KlChunkTileRows {
  template <int W>
  static RLK_ALWAYS_INLINE void run(const KlFromLogitsParams& a, int64_t begin, int64_t end) {
    const KlPass<W, T> pass(a);
    const int64_t first = a.V > 0 ? chunk_of(a.vocab_start) : 0;
    for (int64_t i = begin; i < end; ++i) {
      float* slots = a.state + i * a.chunks * kKlSlotWidth;
      const T* xa = pass.base + a.rows.offset(i);
      const T* xb = pass.ref_base + a.ref_rows.offset(i);
      for (int64_t c0 = 0; c0 < a.V; c0 += kVocabChunk)
        kl_slot_out(slots + (first + c0 / kVocabChunk) * kKlSlotWidth,
                    kl_chunk<W, T>(pass, xa + c0, xb + c0, std::min(kVocabChunk, a.V - c0)));
      if (a.finish && a.chunks > 0) {
        KlStats st = kl_stats_empty();
        for (int64_t c = 0; c < a.chunks; ++c)
          st = fold_kl_chunk(st, kl_slot_in(slots + c * kKlSlotWidth), pass.scale, pass.inv_t);
        slots[0] = kl_finish(st, slots + 1);
      }
    }
  }
};

void kl_vocab_tile_cpu(const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& state,
                       double temperature, int64_t vocab_start, bool finish) {
  KlFromLogitsTensors t;
  const KlFromLogitsParams p =
      kl_vocab_tile_args(logits, ref_logits, state, temperature, vocab_start, finish, t, /*chunk_states=*/true);
  run_logits_rows<KlChunkTileRows>(p, false, logits_row_grain(std::max<int64_t>(2 * p.V, 1)));
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_cpu(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                      const c10::optional<at::Tensor>& mask, double temperature) {
  KlFromLogitsTensors t;
  const KlFromLogitsParams p = kl_from_logits_args(logits, ref_logits, mask, temperature, t);
  run_logits_rows<KlRows>(p, /*backward=*/false, logits_row_grain(2 * p.V));
  return {t.first, t.second};
}

std::tuple<at::Tensor, at::Tensor> kl_from_logits_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& logits,
                                                               const at::Tensor& ref_logits,
                                                               const c10::optional<at::Tensor>& mask,
                                                               const at::Tensor& saved, double temperature,
                                                               bool logits_grad, bool ref_grad) {
  KlFromLogitsTensors t;
  const KlFromLogitsParams p =
      kl_from_logits_backward_args(grad_kl, logits, ref_logits, mask, saved, temperature, logits_grad, ref_grad, t);
  if (logits_grad || ref_grad) run_logits_rows<KlRows>(p, /*backward=*/true, logits_row_grain(2 * p.V));
  return {t.first, t.second};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("kl_from_logits", &rlk::kl_from_logits_cpu);
  m.impl("kl_from_logits_backward", &rlk::kl_from_logits_backward_cpu);
  m.impl("kl_vocab_tile", &rlk::kl_vocab_tile_cpu);
}
