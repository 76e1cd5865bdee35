// KL penalty estimators on the CPU: one pass computing the value and its slope
// (d value / d logprob) per token, so the backward is a multiply.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>

#include "parallel.h"
#include "../args/kl_penalty.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                  c10::string_view kind, double clamp) {
  KlPenaltyTensors t;
  const KlPenaltyParams p = kl_penalty_args(logprobs, ref_logprobs, kind, clamp, t);
  const int64_t n = p.n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(), "kl_penalty_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* a = static_cast<const scalar_t*>(p.logprobs);
    const scalar_t* b = static_cast<const scalar_t*>(p.ref_logprobs);
    acc* v = static_cast<acc*>(p.value);
    acc* d = static_cast<acc*>(p.slope);
    const acc c = acc(p.clamp);
    // The kind is a template argument, so each loop holds one formula and vectorises.
    auto run = [&](auto kind) {
      rlk::cpu::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          kl_penalty_element<acc>(acc(a[i]), acc(b[i]), decltype(kind)::value, c, v + i, d + i);
      });
    };
    switch (p.kind) {
      case kKlK1: return run(std::integral_constant<int, kKlK1>{});
      case kKlK2: return run(std::integral_constant<int, kKlK2>{});
      case kKlK3: return run(std::integral_constant<int, kKlK3>{});
      case kKlAbs: return run(std::integral_constant<int, kKlAbs>{});
      case kKlK1Plus: return run(std::integral_constant<int, kKlK1Plus>{});
      default: return run(std::integral_constant<int, kKlK3Plus>{});
    }
  });
  return {t.value, t.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("kl_penalty", &rlk::kl_penalty_cpu); }
