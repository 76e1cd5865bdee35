// The clipped policy surrogate on the GPU: the per-token math of
// core/policy_loss.h in the chunked blocks of token_loss.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/policy_loss.h"
#include "dispatch.cuh"
#include "token_loss.cuh"

namespace rlk {
namespace cuda {
namespace {

template <int kKL, typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads) policy_loss_kernel(
    const in_t* __restrict__ logprobs, const in_t* __restrict__ old_logprobs,
    const in_t* __restrict__ advantages, bool advantages_per_row, const in_t* __restrict__ weights,
    const in_t* __restrict__ ref_logprobs, const uint8_t* __restrict__ mask, int64_t T, int64_t n_chunks,
    PolicyLossParams params, acc* __restrict__ grad, double* __restrict__ partials) {
  const int64_t row = blockIdx.x / n_chunks;
  const int64_t t0 = (blockIdx.x % n_chunks) * kChunk;
  acc sums[kPolicySlots];
#pragma unroll
  for (int k = 0; k < kPolicySlots; ++k) sums[k] = acc(0);
  const acc row_advantage = advantages_per_row ? cast<acc>(advantages[row]) : acc(0);
#pragma unroll
  for (int i = 0; i < kTokensPerThread; ++i) {
    const int64_t t = t0 + int64_t(i) * kThreads + threadIdx.x;
    if (t >= T) break;
    const int64_t o = row * T + t;
    const bool valid = mask == nullptr || mask[o] != 0;
    if (!valid) {
      // Masked slots are never read: NaN or junk there cannot reach anything.
      if (grad != nullptr) grad[o] = acc(0);
      continue;
    }
    const acc adv = advantages_per_row ? row_advantage : cast<acc>(advantages[o]);
    const acc w = weights != nullptr ? cast<acc>(weights[o]) : acc(1);
    const acc ref = kKL != 0 ? cast<acc>(ref_logprobs[o]) : acc(0);
    const PolicyToken<acc> tok =
        policy_token<kKL, acc>(cast<acc>(logprobs[o]), cast<acc>(old_logprobs[o]), adv, w, ref, params);
    if (grad != nullptr) grad[o] = tok.grad;
    sums[kSlotLoss] += tok.loss;
    sums[kSlotTokens] += acc(1);
    sums[kPolicyClipUpper] += tok.clip_upper;
    sums[kPolicyClipLower] += tok.clip_lower;
    sums[kPolicyClipDual] += tok.clip_dual;
    sums[kPolicyK1] += tok.k1;
    sums[kPolicyK3] += tok.k3;
    sums[kPolicyRatioSum] += tok.ratio;
    sums[kPolicyRatioMax] = tok.ratio > sums[kPolicyRatioMax] ? tok.ratio : sums[kPolicyRatioMax];
    sums[kPolicyRefKL] += tok.kl;
  }
  store_partials<kPolicySlots, kPolicyRatioMax>(sums, partials + int64_t(blockIdx.x) * kPolicySlots);
}

template <int kKL, typename in_t, typename acc>
void launch_policy_kernel(const PolicyLossParams& p, cudaStream_t stream) {
  const int64_t n_chunks = chunks_for(p.rows.T);
  policy_loss_kernel<kKL, in_t, acc><<<static_cast<unsigned int>(p.rows.B * n_chunks), kThreads, 0, stream>>>(
      static_cast<const in_t*>(p.logprobs), static_cast<const in_t*>(p.old_logprobs),
      static_cast<const in_t*>(p.advantages), p.advantages_per_row, static_cast<const in_t*>(p.weights),
      static_cast<const in_t*>(p.ref_logprobs), p.rows.mask, p.rows.T, n_chunks, p, static_cast<acc*>(p.rows.grad),
      p.rows.workspace);
}

}  // namespace

cudaError_t launch_policy_loss(const PolicyLossParams& p, cudaStream_t stream) {
  return launch_typed(p.rows.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using acc = acc_t<in_t>;
    if (p.rows.B > 0 && p.rows.T > 0) {
      switch (p.kl) {
        case KLKind::none: launch_policy_kernel<0, in_t, acc>(p, stream); break;
        case KLKind::k1: launch_policy_kernel<1, in_t, acc>(p, stream); break;
        case KLKind::k2: launch_policy_kernel<2, in_t, acc>(p, stream); break;
        case KLKind::k3: launch_policy_kernel<3, in_t, acc>(p, stream); break;
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return launch_finalize<kPolicySlots, kPolicyRatioMax, acc>(p.rows, stream);
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/policy_loss.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/policy_loss.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& ref_logprobs, c10::ArrayRef<double> coefficients, c10::string_view kl,
    c10::string_view agg, bool need_grad) {
  c10::cuda::CUDAGuard guard(logprobs.device());
  TokenLossOutputs out;
  PolicyLossParams p = policy_loss_args(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, coefficients,
                                        kl, agg, need_grad, out);
  const at::Tensor workspace = at::empty({cuda::token_loss_workspace(p.rows.B, p.rows.T, kPolicySlots)},
                                         logprobs.options().dtype(at::kDouble));
  p.rows.workspace = workspace.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_policy_loss(p, current_stream()));
  return out.tuple();
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("policy_loss", &rlk::policy_loss_cuda); }
#endif  // TORCH_EXTENSION_NAME
