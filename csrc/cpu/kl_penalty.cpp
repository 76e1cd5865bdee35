// KL penalty estimators on the CPU: one pass computing the value and its slope
// (d value / d logprob) per token, so the backward is a multiply.
//
// The element loop is instantiated per kind (one formula per loop) and per ISA
// (RLK_CPU_CLONES), with restrict pointers and the branch-free core formula, so
// it vectorises: k3 through a polynomial e^x (exp_acc) instead of a scalar libm
// call.  Before, the scalar loop took 4-6 ns a token for k3 and abs (libm exp, a
// mispredicted branch per sign), ~1.6x the composed PyTorch at 64k tokens.
// 16-bit inputs are staged into float32 chunks, so the arithmetic loop exists
// per accumulation type only.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "parallel.h"
#include "simd_loops.h"
#include "../args/kl_penalty.h"

namespace rlk {
namespace {

using cpu::kChunk;
using cpu::staged;

template <int kKind, typename acc>
RLK_CPU_CLONES void kl_chunk(const acc* __restrict__ logprobs, const acc* __restrict__ ref_logprobs, int64_t n,
                             acc clamp, acc* __restrict__ value, acc* __restrict__ slope) {
  for (int64_t i = 0; i < n; ++i)
    kl_penalty_element<acc>(logprobs[i], ref_logprobs[i], kKind, clamp, value + i, slope + i);
}

// A task is worth a thread wake-up from about this many elements on (~0.4 ms of one
// thread at the measured 0.18 ns an element, simd_loops.h): smaller problems finish on
// the calling thread before a woken one would start.
constexpr int64_t kTaskElements = int64_t(1) << 21;

template <int kKind, typename scalar_t>
void kl_elements(const KlPenaltyParams& p) {
  using acc = acc_t<scalar_t>;
  const scalar_t* a = static_cast<const scalar_t*>(p.logprobs);
  const scalar_t* b = static_cast<const scalar_t*>(p.ref_logprobs);
  acc* v = static_cast<acc*>(p.value);
  acc* d = static_cast<acc*>(p.slope);
  const acc clamp = acc(p.clamp);
  rlk::cpu::parallel_for(0, p.n, kTaskElements, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<acc, scalar_t>) {
      kl_chunk<kKind, acc>(a + begin, b + begin, end - begin, clamp, v + begin, d + begin);
    } else {
      alignas(64) acc a_buf[kChunk], b_buf[kChunk];
      for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
        const int64_t n = std::min(kChunk, end - i0);
        kl_chunk<kKind, acc>(staged<acc>(a + i0, n, a_buf), staged<acc>(b + i0, n, b_buf), n, clamp, v + i0,
                             d + i0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                  c10::string_view kind, double clamp) {
  KlPenaltyTensors t;
  const KlPenaltyParams p = kl_penalty_args(logprobs, ref_logprobs, kind, clamp, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "kl_penalty_cpu", [&] {
    switch (p.kind) {
      case kKlK1: return kl_elements<kKlK1, scalar_t>(p);
      case kKlK2: return kl_elements<kKlK2, scalar_t>(p);
      case kKlK3: return kl_elements<kKlK3, scalar_t>(p);
      case kKlAbs: return kl_elements<kKlAbs, scalar_t>(p);
      case kKlK1Plus: return kl_elements<kKlK1Plus, scalar_t>(p);
      default: return kl_elements<kKlK3Plus, scalar_t>(p);
    }
  });
  return {t.value, t.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("kl_penalty", &rlk::kl_penalty_cpu); }
