// scale_rows on the GPU, the backward of policy_loss and value_loss, and the
// workspace size of their chunked forward (token_loss.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "dispatch.cuh"
#include "token_loss.cuh"

namespace rlk {
namespace cuda {
namespace {

template <typename out_t, typename acc>
__global__ void scale_rows_kernel(const acc* __restrict__ grad, const acc* __restrict__ row_scale,
                                  const acc* __restrict__ grad_loss, int64_t B, int64_t T, out_t* __restrict__ out) {
  const acc g = *grad_loss;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * T; i += stride)
    out[i] = cast<out_t>(grad[i] * (g * row_scale[i / T]));
}

}  // namespace

int64_t token_loss_workspace(int64_t B, int64_t T, int slots) { return B * chunks_for(T) * slots; }

// p.dtype is the output's; grad, row_scale and grad_loss are in its accumulation type.
cudaError_t launch_scale_rows(const ScaleRowsParams& p, cudaStream_t stream) {
  if (p.B * p.T == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((p.B * p.T + kThreads - 1) / kThreads, int64_t(1) << 16);
  return launch_typed(p.dtype, [&](auto tag) {
    using out_t = decltype(tag);
    using acc = acc_t<out_t>;
    scale_rows_kernel<out_t, acc><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        static_cast<const acc*>(p.grad), static_cast<const acc*>(p.row_scale), static_cast<const acc*>(p.grad_loss),
        p.B, p.T, static_cast<out_t*>(p.out));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/token_loss.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/token_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

at::Tensor scale_rows_cuda(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                           at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out, grad_loss_value;
  const ScaleRowsParams p = scale_rows_args(grad, row_scale, grad_loss, dtype, out, grad_loss_value);
  C10_CUDA_CHECK(cuda::launch_scale_rows(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("scale_rows", &rlk::scale_rows_cuda); }
#endif  // TORCH_EXTENSION_NAME
