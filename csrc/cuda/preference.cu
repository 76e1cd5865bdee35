// Preference losses on the GPU: one thread per pair for dpo_loss (the shared
// math of core/preference.h), one block per row for sequence_logprobs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../core/preference.h"
#include "block_reduce.cuh"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kPairThreads = 256;
constexpr int kRowThreads = 256;

template <typename in_t, typename acc>
__global__ void dpo_loss_kernel(const in_t* __restrict__ policy_chosen, const in_t* __restrict__ policy_rejected,
                                const in_t* __restrict__ ref_chosen, const in_t* __restrict__ ref_rejected,
                                int64_t B, PreferenceKind kind, acc beta, acc label_smoothing,
                                acc* __restrict__ losses, acc* __restrict__ chosen_rewards,
                                acc* __restrict__ rejected_rewards, acc* __restrict__ dlogits) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const PreferencePair<acc> pair =
      preference_pair<acc>(kind, beta, label_smoothing, cast<acc>(policy_chosen[b]), cast<acc>(policy_rejected[b]),
                           cast<acc>(ref_chosen[b]), cast<acc>(ref_rejected[b]));
  losses[b] = pair.loss;
  dlogits[b] = pair.dlogits;
  chosen_rewards[b] = pair.chosen_reward;
  rejected_rewards[b] = pair.rejected_reward;
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kRowThreads) sequence_logprobs_kernel(
    const in_t* __restrict__ token_logprobs, const uint8_t* __restrict__ mask, int64_t T, bool average,
    acc* __restrict__ out, acc* __restrict__ counts) {
  __shared__ acc scratch[32];
  const int64_t row = blockIdx.x;
  acc total = acc(0), count = acc(0);
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t o = row * T + t;
    if (mask != nullptr && mask[o] == 0) continue;  // never read: NaN there stays out
    total += cast<acc>(token_logprobs[o]);
    count += acc(1);
  }
  total = block_reduce<Reduce::Sum>(total, scratch);
  count = block_reduce<Reduce::Sum>(count, scratch);
  if (threadIdx.x == 0) {
    out[row] = average ? (count > acc(0) ? total / count : acc(0)) : total;
    counts[row] = count;
  }
}

template <typename out_t, typename acc>
__global__ void sequence_logprobs_backward_kernel(const acc* __restrict__ grad, const uint8_t* __restrict__ mask,
                                                  const acc* __restrict__ num_tokens, bool average, int64_t B,
                                                  int64_t T, out_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * T; i += stride) {
    const int64_t b = i / T;
    const acc n = num_tokens[b];
    const acc per_row = average ? (n > acc(0) ? grad[b] / n : acc(0)) : grad[b];
    out[i] = cast<out_t>(mask == nullptr || mask[i] != 0 ? per_row : acc(0));
  }
}

}  // namespace

cudaError_t launch_dpo_loss(const PreferenceParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const unsigned int blocks = static_cast<unsigned int>((p.B + kPairThreads - 1) / kPairThreads);
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using acc = acc_t<in_t>;
    dpo_loss_kernel<in_t, acc><<<blocks, kPairThreads, 0, stream>>>(
        static_cast<const in_t*>(p.policy_chosen), static_cast<const in_t*>(p.policy_rejected),
        static_cast<const in_t*>(p.ref_chosen), static_cast<const in_t*>(p.ref_rejected), p.B, p.kind, acc(p.beta),
        acc(p.label_smoothing), static_cast<acc*>(p.losses), static_cast<acc*>(p.chosen_rewards),
        static_cast<acc*>(p.rejected_rewards), static_cast<acc*>(p.dlogits));
  });
}

cudaError_t launch_sequence_logprobs(const SequenceLogprobsParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using acc = acc_t<in_t>;
    sequence_logprobs_kernel<in_t, acc><<<static_cast<unsigned int>(p.B), kRowThreads, 0, stream>>>(
        static_cast<const in_t*>(p.token_logprobs), p.mask, p.T, p.average, static_cast<acc*>(p.sums),
        static_cast<acc*>(p.counts));
  });
}

// p.dtype is the output's (the gradient of token_logprobs).
cudaError_t launch_sequence_logprobs_backward(const SequenceLogprobsParams& p, cudaStream_t stream) {
  if (p.B * p.T == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((p.B * p.T + kPairThreads - 1) / kPairThreads, int64_t(1) << 16);
  return launch_typed(p.dtype, [&](auto tag) {
    using out_t = decltype(tag);
    using acc = acc_t<out_t>;
    sequence_logprobs_backward_kernel<out_t, acc><<<static_cast<unsigned int>(blocks), kPairThreads, 0, stream>>>(
        static_cast<const acc*>(p.grad), p.mask, static_cast<const acc*>(p.num_tokens), p.average, p.B, p.T,
        static_cast<out_t*>(p.grad_tokens));
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/preference.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include "../args/preference.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_cuda(
    const at::Tensor& policy_chosen, const at::Tensor& policy_rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view kind, double label_smoothing) {
  c10::cuda::CUDAGuard guard(policy_chosen.device());
  PreferenceOutputs out;
  const PreferenceParams p =
      dpo_loss_args(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing, out);
  C10_CUDA_CHECK(cuda::launch_dpo_loss(p, current_stream()));
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor> sequence_logprobs_cuda(const at::Tensor& token_logprobs,
                                                          const c10::optional<at::Tensor>& mask, bool average) {
  c10::cuda::CUDAGuard guard(token_logprobs.device());
  at::Tensor sums, counts;
  const SequenceLogprobsParams p = sequence_logprobs_args(token_logprobs, mask, average, sums, counts);
  C10_CUDA_CHECK(cuda::launch_sequence_logprobs(p, current_stream()));
  return {sums, counts};
}

at::Tensor sequence_logprobs_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& num_tokens, bool average, int64_t T,
                                          at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out;
  const SequenceLogprobsParams p = sequence_logprobs_backward_args(grad, mask, num_tokens, average, T, dtype, out);
  C10_CUDA_CHECK(cuda::launch_sequence_logprobs_backward(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cuda);
  m.impl("dpo_loss", &rlk::dpo_loss_cuda);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cuda);
}
#endif  // TORCH_EXTENSION_NAME
