// Preference losses on the GPU: one thread per pair for dpo_loss (the shared
// math of core/preference.h), one block per row for sequence_logprobs, one block
// per pair for dpo_sequence_loss (both fused).
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

// One block per pair: the masked sums of its four rows (policy and reference,
// chosen and rejected; each mask byte read once for both), then thread 0 does the
// pair's math (core/preference.h) and writes its outputs and the two rows' coef.
template <typename in_t, typename acc>
__global__ void __launch_bounds__(kRowThreads) dpo_sequence_loss_kernel(
    const in_t* __restrict__ policy, const in_t* __restrict__ ref, const uint8_t* __restrict__ mask, int64_t B,
    int64_t T, PreferenceKind kind, acc beta, acc label_smoothing, bool average, acc* __restrict__ losses,
    acc* __restrict__ chosen_rewards, acc* __restrict__ rejected_rewards, acc* __restrict__ coef) {
  __shared__ acc scratch[32];
  const int64_t pair = blockIdx.x;
  acc values[4], counts[2];  // policy chosen, policy rejected, ref chosen, ref rejected
  for (int side = 0; side < 2; ++side) {
    const int64_t row = pair + side * B;
    acc policy_sum = acc(0), ref_sum = acc(0), count = acc(0);
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const int64_t o = row * T + t;
      if (mask != nullptr && mask[o] == 0) continue;  // never read: NaN there stays out
      policy_sum += cast<acc>(policy[o]);
      ref_sum += cast<acc>(ref[o]);
      count += acc(1);
    }
    policy_sum = block_reduce<Reduce::Sum>(policy_sum, scratch);
    ref_sum = block_reduce<Reduce::Sum>(ref_sum, scratch);
    count = block_reduce<Reduce::Sum>(count, scratch);
    const bool mean = average && count > acc(0);
    values[side] = average ? (mean ? policy_sum / count : acc(0)) : policy_sum;
    values[2 + side] = average ? (mean ? ref_sum / count : acc(0)) : ref_sum;
    counts[side] = count;
  }
  if (threadIdx.x != 0) return;
  const PreferencePair<acc> out = preference_pair<acc>(kind, beta, label_smoothing, values[0], values[1], values[2],
                                                       values[3]);
  losses[pair] = out.loss;
  chosen_rewards[pair] = out.chosen_reward;
  rejected_rewards[pair] = out.rejected_reward;
  coef[pair] = sequence_coef<acc>(out.dlogits, acc(1), average, counts[0]);
  coef[B + pair] = sequence_coef<acc>(out.dlogits, acc(-1), average, counts[1]);
}

template <typename out_t, typename acc>
__global__ void dpo_sequence_loss_backward_kernel(const acc* __restrict__ grad_losses, int64_t grad_stride,
                                                  const acc* __restrict__ coef, const uint8_t* __restrict__ mask,
                                                  acc scale, int64_t B, int64_t T, out_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < 2 * B * T; i += stride) {
    const int64_t r = i / T;
    const acc value = scale * grad_losses[(r < B ? r : r - B) * grad_stride] * coef[r];
    out[i] = cast<out_t>(mask == nullptr || mask[i] != 0 ? value : acc(0));
  }
}

}  // namespace

cudaError_t launch_dpo_sequence_loss(const DpoSequenceParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using acc = acc_t<in_t>;
    dpo_sequence_loss_kernel<in_t, acc><<<static_cast<unsigned int>(p.B), kRowThreads, 0, stream>>>(
        static_cast<const in_t*>(p.policy_logprobs), static_cast<const in_t*>(p.ref_logprobs), p.mask, p.B, p.T,
        p.kind, acc(p.beta), acc(p.label_smoothing), p.average, static_cast<acc*>(p.losses),
        static_cast<acc*>(p.chosen_rewards), static_cast<acc*>(p.rejected_rewards), static_cast<acc*>(p.coef));
  });
}

// p.dtype is the output's (the gradient of the token log-probs).
cudaError_t launch_dpo_sequence_loss_backward(const DpoSequenceParams& p, cudaStream_t stream) {
  if (p.B * p.T == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((2 * p.B * p.T + kPairThreads - 1) / kPairThreads, int64_t(1) << 16);
  return launch_typed(p.dtype, [&](auto tag) {
    using out_t = decltype(tag);
    using acc = acc_t<out_t>;
    dpo_sequence_loss_backward_kernel<out_t, acc><<<static_cast<unsigned int>(blocks), kPairThreads, 0, stream>>>(
        static_cast<const acc*>(p.grad_losses), p.grad_stride, static_cast<const acc*>(p.coef), p.mask, acc(p.scale),
        p.B, p.T, static_cast<out_t*>(p.grad_tokens));
  });
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_sequence_loss_cuda(
    const at::Tensor& policy_logprobs, const at::Tensor& ref_logprobs, const c10::optional<at::Tensor>& mask,
    double beta, c10::string_view kind, double label_smoothing, bool average) {
  c10::cuda::CUDAGuard guard(policy_logprobs.device());
  PreferenceOutputs out;
  const DpoSequenceParams p = dpo_sequence_loss_args(policy_logprobs, ref_logprobs, mask, beta, kind,
                                                     label_smoothing, average, out);
  C10_CUDA_CHECK(cuda::launch_dpo_sequence_loss(p, current_stream()));
  return out.tuple();
}

at::Tensor dpo_sequence_loss_backward_cuda(const at::Tensor& grad_losses, const c10::optional<at::Tensor>& mask,
                                          const at::Tensor& coef, double scale, int64_t T, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(grad_losses.device());
  at::Tensor out;
  const DpoSequenceParams p = dpo_sequence_loss_backward_args(grad_losses, mask, coef, scale, T, dtype, out);
  C10_CUDA_CHECK(cuda::launch_dpo_sequence_loss_backward(p, current_stream()));
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) {
  m.impl("dpo_sequence_loss", &rlk::dpo_sequence_loss_cuda);
  m.impl("dpo_sequence_loss_backward", &rlk::dpo_sequence_loss_backward_cuda);
  m.impl("sequence_logprobs_backward", &rlk::sequence_logprobs_backward_cuda);
  m.impl("dpo_loss", &rlk::dpo_loss_cuda);
  m.impl("sequence_logprobs", &rlk::sequence_logprobs_cuda);
}
#endif  // TORCH_EXTENSION_NAME
