// KL penalty estimators on the GPU (torch-free): one thread per token, value
// and slope from the shared core formulas (core/kl_penalty.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/kl_penalty.h"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename in_t, typename out_t>
__global__ void kl_penalty_kernel(const in_t* __restrict__ logprobs, const in_t* __restrict__ ref_logprobs,
                                  int64_t n, int kind, out_t clamp, out_t* __restrict__ value,
                                  out_t* __restrict__ slope) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    kl_penalty_element<out_t>(cast<out_t>(logprobs[i]), cast<out_t>(ref_logprobs[i]), kind, clamp, value + i,
                              slope + i);
}

}  // namespace

cudaError_t launch_kl_penalty(const KlPenaltyParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  int64_t blocks = (p.n + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    kl_penalty_kernel<in_t, out_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.logprobs), static_cast<const in_t*>(p.ref_logprobs), p.n, p.kind,
        out_t(p.clamp), static_cast<out_t*>(p.value), static_cast<out_t*>(p.slope));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/kl_penalty.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/kl_penalty.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_penalty_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                   c10::string_view kind, double clamp) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  KlPenaltyTensors t;
  const KlPenaltyParams p = kl_penalty_args(logprobs, ref_logprobs, kind, clamp, t);
  C10_CUDA_CHECK(cuda::launch_kl_penalty(p, current_stream()));
  return {t.value, t.slope};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("kl_penalty", &rlk::kl_penalty_cuda); }
#endif  // TORCH_EXTENSION_NAME
