#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../core/common.h"
#include "../torch_common.h"
#include "cuda_types.h"
#include "launchers.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2, "x must be [R, C], got ", x.sizes());
  const int64_t R = x.size(0), C = x.size(1);
  check_rows(x, "x", R, C);
  check_same_device(x, mask, "mask");
  const uint8_t* m = optional_bool_ptr(mask, "mask", R, C);
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
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  check_same_device(x, mask, "mask");
  const int64_t N = x.numel();
  const uint8_t* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->numel() == N,
                "mask must be a contiguous bool tensor of x's size");
    m = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
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
