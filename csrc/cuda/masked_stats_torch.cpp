#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../core/common.h"
#include "../args/advantages.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  const uint8_t* m = check_row_mean_args(x, mask);
  const int64_t R = x.size(0), C = x.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({R}, x.options().dtype(out_dtype_for(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_row_mean_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_masked_row_mean(cuda::dptr(x.data_ptr<scalar_t>()), m, R, C,
                                                out.data_ptr<acc>(),
                                                c10::cuda::getCurrentCUDAStream().stream()));
  });
  return out;
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                              double eps) {
  const uint8_t* m = check_whiten_args(x, mask);
  const int64_t N = x.numel();
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(out_dtype_for(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_cuda", [&] {
    using acc = acc_t<scalar_t>;
    C10_CUDA_CHECK(cuda::launch_masked_whiten(cuda::dptr(x.data_ptr<scalar_t>()), m, N, shift_mean, eps,
                                              out.data_ptr<acc>(), c10::cuda::getCurrentCUDAStream().stream()));
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("masked_row_mean", &rlk::masked_row_mean_cuda);
  m.impl("masked_whiten", &rlk::masked_whiten_cuda);
}
