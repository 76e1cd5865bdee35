#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "../core/masked_stats.h"
#include "../torch_common.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2, "x must be [R, C], got ", x.sizes());
  const int64_t R = x.size(0), C = x.size(1);
  check_rows(x, "x", R, C);
  const uint8_t* m = optional_bool_ptr(mask, "mask", R, C);
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
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t N = x.numel();
  const uint8_t* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == N,
                "mask must be a contiguous bool tensor of x's size");
    m = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
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
