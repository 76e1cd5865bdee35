// Preference losses on the GPU: one thread per pair for dpo_loss (the shared
// math of core/preference.h), one block per row for sequence_logprobs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "../core/preference.h"
#include "block_reduce.cuh"
#include "launchers.h"

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

template <typename out_t, typename acc>
cudaError_t launch_sequence_logprobs_backward(const acc* grad, const uint8_t* mask, const acc* num_tokens,
                                              bool average, int64_t B, int64_t T, out_t* out, cudaStream_t stream) {
  if (B * T == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((B * T + kPairThreads - 1) / kPairThreads, int64_t(1) << 16);
  sequence_logprobs_backward_kernel<out_t, acc><<<static_cast<unsigned int>(blocks), kPairThreads, 0, stream>>>(
      grad, mask, num_tokens, average, B, T, out);
  return cudaGetLastError();
}

template <typename in_t, typename acc>
cudaError_t launch_dpo_loss(const in_t* policy_chosen, const in_t* policy_rejected, const in_t* ref_chosen,
                            const in_t* ref_rejected, int64_t B, int kind, double beta, double label_smoothing,
                            acc* losses, acc* chosen_rewards, acc* rejected_rewards, acc* dlogits,
                            cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const unsigned int blocks = static_cast<unsigned int>((B + kPairThreads - 1) / kPairThreads);
  dpo_loss_kernel<in_t, acc><<<blocks, kPairThreads, 0, stream>>>(
      policy_chosen, policy_rejected, ref_chosen, ref_rejected, B, static_cast<PreferenceKind>(kind), acc(beta),
      acc(label_smoothing), losses, chosen_rewards, rejected_rewards, dlogits);
  return cudaGetLastError();
}

template <typename in_t, typename acc>
cudaError_t launch_sequence_logprobs(const in_t* token_logprobs, const uint8_t* mask, int64_t B, int64_t T,
                                     bool average, acc* out, acc* counts, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sequence_logprobs_kernel<in_t, acc><<<static_cast<unsigned int>(B), kRowThreads, 0, stream>>>(
      token_logprobs, mask, T, average, out, counts);
  return cudaGetLastError();
}

#define RLK_INSTANTIATE(in_t, acc)                                                                            \
  template cudaError_t launch_dpo_loss<in_t, acc>(const in_t*, const in_t*, const in_t*, const in_t*,        \
                                                  int64_t, int, double, double, acc*, acc*, acc*, acc*,      \
                                                  cudaStream_t);                                             \
  template cudaError_t launch_sequence_logprobs<in_t, acc>(const in_t*, const uint8_t*, int64_t, int64_t,    \
                                                           bool, acc*, acc*, cudaStream_t);   \
  template cudaError_t launch_sequence_logprobs_backward<in_t, acc>(const acc*, const uint8_t*, const acc*,  \
                                                                    bool, int64_t, int64_t, in_t*,         \
                                                                    cudaStream_t);
RLK_INSTANTIATE(float, float)
RLK_INSTANTIATE(double, double)
RLK_INSTANTIATE(__half, float)
RLK_INSTANTIATE(__nv_bfloat16, float)
#undef RLK_INSTANTIATE

}  // namespace cuda
}  // namespace rlk
