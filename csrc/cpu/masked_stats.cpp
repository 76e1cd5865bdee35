#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "../core/masked_stats.h"
#include "../args/advantages.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  const uint8_t* m = check_row_mean_args(x, mask);
  const int64_t R = x.size(0), C = x.size(1);
  auto out = at::empty({R}, x.options().dtype(out_dtype_for(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_row_mean_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc* op = out.data_ptr<acc>();
    at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const MaskedSums<acc> s = masked_sums<scalar_t, acc>(xp + r * C, m ? m + r * C : nullptr, C);
        op[r] = s.count > 0 ? s.sum / acc(s.count) : acc(0);
      }
    });
  });
  return out;
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                             double eps) {
  const uint8_t* m = check_whiten_args(x, mask);
  const int64_t N = x.numel();
  auto out = at::empty(x.sizes(), x.options().dtype(out_dtype_for(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const MaskedSums<acc> s = masked_sums<scalar_t, acc>(xp, m, N);
    const acc mean = s.count > 0 ? s.sum / acc(s.count) : acc(0);
    const acc sq = masked_sq_dev<scalar_t, acc>(xp, m, N, mean);
    const WhitenCoef<acc> c = whiten_coefficients<acc>(mean, sq, s.count, shift_mean, acc(eps));
    acc* op = out.data_ptr<acc>();
    for (int64_t i = 0; i < N; ++i) op[i] = whiten_value<acc>(cast<acc>(xp[i]), m == nullptr || m[i], c);
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("masked_row_mean", &rlk::masked_row_mean_cpu);
  m.impl("masked_whiten", &rlk::masked_whiten_cpu);
}
