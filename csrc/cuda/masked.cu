// Masked row means (one block per row) and masked whitening over a whole
// tensor (one block: two reductions, then an elementwise pass).  Block
// reductions keep both deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/masked.h"
#include "block_reduce.cuh"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWhitenThreads = 1024;

template <typename in_t, typename acc>
__global__ void masked_row_mean_kernel(const in_t* __restrict__ x, const uint8_t* __restrict__ mask,
                                       int64_t C, acc* __restrict__ out) {
  __shared__ acc scratch[32];
  const int64_t row = blockIdx.x;
  const in_t* xr = x + row * C;
  const uint8_t* mr = mask ? mask + row * C : nullptr;
  acc sum = 0, count = 0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) {
    const bool valid = mr == nullptr || mr[i] != 0;
    sum += valid ? cast<acc>(xr[i]) : acc(0);
    count += valid ? acc(1) : acc(0);
  }
  sum = block_reduce<Reduce::Sum>(sum, scratch);
  count = block_reduce<Reduce::Sum>(count, scratch);
  if (threadIdx.x == 0) out[row] = count > 0 ? sum / count : acc(0);
}

template <typename in_t, typename acc>
__global__ void masked_whiten_kernel(const in_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t N,
                                     bool shift_mean, acc eps, acc* __restrict__ out) {
  __shared__ acc scratch[32];
  acc sum = 0, count = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const bool valid = mask == nullptr || mask[i] != 0;
    sum += valid ? cast<acc>(x[i]) : acc(0);
    count += valid ? acc(1) : acc(0);
  }
  sum = block_reduce<Reduce::Sum>(sum, scratch);
  count = block_reduce<Reduce::Sum>(count, scratch);
  const acc mean = count > 0 ? sum / count : acc(0);
  acc sq = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc d = cast<acc>(x[i]) - mean;
    sq += (mask == nullptr || mask[i] != 0) ? d * d : acc(0);
  }
  sq = block_reduce<Reduce::Sum>(sq, scratch);
  const WhitenCoef<acc> c = whiten_coefficients<acc>(mean, sq, static_cast<int64_t>(count), shift_mean, eps);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
    out[i] = whiten_value<acc>(cast<acc>(x[i]), mask == nullptr || mask[i] != 0, c);
}

}  // namespace

cudaError_t launch_masked_row_mean(const MaskedParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    masked_row_mean_kernel<in_t, out_t><<<static_cast<unsigned int>(p.rows), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.x), p.mask, p.cols, static_cast<out_t*>(p.out));
  });
}

cudaError_t launch_masked_whiten(const MaskedParams& p, cudaStream_t stream) {
  if (p.cols == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    masked_whiten_kernel<in_t, out_t><<<1, kWhitenThreads, 0, stream>>>(
        static_cast<const in_t*>(p.x), p.mask, p.cols, p.shift_mean, out_t(p.eps), static_cast<out_t*>(p.out));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/masked.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/masked.h"
#include "torch_launch.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const MaskedParams p = masked_row_mean_args(x, mask, out);
  C10_CUDA_CHECK(cuda::launch_masked_row_mean(p, current_stream()));
  return out;
}

at::Tensor masked_whiten_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                              double eps) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  const MaskedParams p = masked_whiten_args(x, mask, shift_mean, eps, out);
  C10_CUDA_CHECK(cuda::launch_masked_whiten(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("masked_row_mean", &rlk::masked_row_mean_cuda);
  m.impl("masked_whiten", &rlk::masked_whiten_cuda);
}
#endif  // TORCH_EXTENSION_NAME
