// The (optionally clipped) value loss on the GPU: the per-token math of
// core/value_loss.h in the chunked blocks of token_loss.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "../core/value_loss.h"
#include "dispatch.cuh"
#include "token_loss.cuh"

namespace rlk {
namespace cuda {
namespace {

template <bool kClip, typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads) value_loss_kernel(
    const in_t* __restrict__ values, const in_t* __restrict__ old_values, const in_t* __restrict__ returns,
    const uint8_t* __restrict__ mask, int64_t T, int64_t n_chunks, acc clip, acc* __restrict__ grad,
    double* __restrict__ partials) {
  const int64_t row = blockIdx.x / n_chunks;
  const int64_t t0 = (blockIdx.x % n_chunks) * kChunk;
  acc sums[kValueSlots];
#pragma unroll
  for (int k = 0; k < kValueSlots; ++k) sums[k] = acc(0);
#pragma unroll
  for (int i = 0; i < kTokensPerThread; ++i) {
    const int64_t t = t0 + int64_t(i) * kThreads + threadIdx.x;
    if (t >= T) break;
    const int64_t o = row * T + t;
    if (mask != nullptr && mask[o] == 0) {
      if (grad != nullptr) grad[o] = acc(0);
      continue;
    }
    const acc old = kClip ? cast<acc>(old_values[o]) : acc(0);
    const ValueToken<acc> tok = value_token<kClip, acc>(cast<acc>(values[o]), old, cast<acc>(returns[o]), clip);
    if (grad != nullptr) grad[o] = tok.grad;
    sums[kSlotLoss] += tok.loss;
    sums[kSlotTokens] += acc(1);
    sums[kValueClipped] += tok.clipped;
  }
  store_partials<kValueSlots, -1>(sums, partials + int64_t(blockIdx.x) * kValueSlots);
}

}  // namespace

cudaError_t launch_value_loss(const ValueLossParams& p, cudaStream_t stream) {
  return launch_typed(p.rows.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using acc = acc_t<in_t>;
    const TokenLossParams& r = p.rows;
    const int64_t n_chunks = chunks_for(r.T);
    if (r.B > 0 && r.T > 0) {
      const unsigned int blocks = static_cast<unsigned int>(r.B * n_chunks);
      const in_t* values = static_cast<const in_t*>(p.values);
      const in_t* old_values = static_cast<const in_t*>(p.old_values);
      const in_t* returns = static_cast<const in_t*>(p.returns);
      acc* grad = static_cast<acc*>(r.grad);
      if (std::isfinite(p.clip)) {
        value_loss_kernel<true, in_t, acc><<<blocks, kThreads, 0, stream>>>(values, old_values, returns, r.mask, r.T,
                                                                             n_chunks, acc(p.clip), grad, r.workspace);
      } else {
        value_loss_kernel<false, in_t, acc><<<blocks, kThreads, 0, stream>>>(values, old_values, returns, r.mask, r.T,
                                                                              n_chunks, acc(0), grad, r.workspace);
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return launch_finalize<kValueSlots, -1, acc>(r, stream);
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/value_loss.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/value_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> value_loss_cuda(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
    const c10::optional<at::Tensor>& mask, c10::ArrayRef<double> coefficients, c10::string_view agg,
    bool need_grad) {
  c10::cuda::CUDAGuard guard(values.device());
  TokenLossOutputs out;
  ValueLossParams p = value_loss_args(values, old_values, returns, mask, coefficients, agg, need_grad, out);
  const at::Tensor workspace = at::empty({cuda::token_loss_workspace(p.rows.B, p.rows.T, kValueSlots)},
                                         values.options().dtype(at::kDouble));
  p.rows.workspace = workspace.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_value_loss(p, current_stream()));
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("value_loss", &rlk::value_loss_cuda); }
#endif  // TORCH_EXTENSION_NAME
