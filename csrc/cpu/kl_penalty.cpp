// KL penalty estimators on the CPU: one pass computing the value and its slope
// (d value / d logprob) per token, so the backward is a multiply.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../core/kl_penalty.h"
#include "../torch_common.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                  c10::string_view kind, double clamp) {
  const int code = kl_kind_code(std::string(kind).c_str());
  TORCH_CHECK(code >= 0, "kl_penalty: unknown kind '", kind, "'");
  TORCH_CHECK(clamp > 0, "kl_penalty: clamp must be > 0, got ", clamp);
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes(), "kl_penalty: ref_logprobs must have the shape of logprobs");
  TORCH_CHECK(ref_logprobs.scalar_type() == logprobs.scalar_type(),
              "kl_penalty: ref_logprobs must have the dtype of logprobs");
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous();
  const auto out_dtype = out_dtype_for(lp.scalar_type());
  at::Tensor value = at::empty(lp.sizes(), lp.options().dtype(out_dtype));
  at::Tensor slope = at::empty(lp.sizes(), lp.options().dtype(out_dtype));
  const int64_t n = lp.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "kl_penalty_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    acc* v = value.data_ptr<acc>();
    acc* d = slope.data_ptr<acc>();
    const acc c = acc(clamp);
    // The kind is a template argument, so each loop holds one formula and vectorises.
    auto run = [&](auto kind) {
      at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          kl_penalty_element<acc>(acc(a[i]), acc(b[i]), decltype(kind)::value, c, v + i, d + i);
      });
    };
    switch (code) {
      case kKlK1: return run(std::integral_constant<int, kKlK1>{});
      case kKlK2: return run(std::integral_constant<int, kKlK2>{});
      case kKlK3: return run(std::integral_constant<int, kKlK3>{});
      case kKlAbs: return run(std::integral_constant<int, kKlAbs>{});
      case kKlK1Plus: return run(std::integral_constant<int, kKlK1Plus>{});
      default: return run(std::integral_constant<int, kKlK3Plus>{});
    }
  });
  return {value, slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("kl_penalty", &rlk::kl_penalty_cpu); }
