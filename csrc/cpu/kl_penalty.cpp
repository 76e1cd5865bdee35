// KL penalty estimators on the CPU: one pass computing the value and its slope
// (d value / d logprob) per token, so the backward is a multiply.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../args/logprobs.h"
#include "../core/kl_penalty.h"
#include "../torch_common.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                  c10::string_view kind, double clamp) {
  const KlPenaltyArgs k = kl_penalty_args(logprobs, ref_logprobs, kind, clamp);
  const int64_t n = k.lp.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.lp.scalar_type(), "kl_penalty_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* a = k.lp.data_ptr<scalar_t>();
    const scalar_t* b = k.ref.data_ptr<scalar_t>();
    acc* v = k.value.data_ptr<acc>();
    acc* d = k.slope.data_ptr<acc>();
    const acc c = acc(clamp);
    // The kind is a template argument, so each loop holds one formula and vectorises.
    auto run = [&](auto kind) {
      at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          kl_penalty_element<acc>(acc(a[i]), acc(b[i]), decltype(kind)::value, c, v + i, d + i);
      });
    };
    switch (k.code) {
      case kKlK1: return run(std::integral_constant<int, kKlK1>{});
      case kKlK2: return run(std::integral_constant<int, kKlK2>{});
      case kKlK3: return run(std::integral_constant<int, kKlK3>{});
      case kKlAbs: return run(std::integral_constant<int, kKlAbs>{});
      case kKlK1Plus: return run(std::integral_constant<int, kKlK1Plus>{});
      default: return run(std::integral_constant<int, kKlK3Plus>{});
    }
  });
  return {k.value, k.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("kl_penalty", &rlk::kl_penalty_cpu); }
