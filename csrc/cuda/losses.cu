// Token-level losses on the GPU (policy surrogate, value loss).  One block per
// (row, chunk of kChunk tokens) evaluates the shared per-token math of
// core/policy_loss.h / core/value_loss.h, writes the per-token gradient and
// stores the chunk's partial sums; one finalising block applies the
// aggregation of core/loss_agg.h.  Every reduction runs in a fixed order, so
// results are deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../core/loss_agg.h"
#include "../core/policy_loss.h"
#include "../core/value_loss.h"
#include "block_reduce.cuh"
#include "launchers.h"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 4;
constexpr int64_t kChunk = int64_t(kThreads) * kTokensPerThread;
constexpr int kFinalThreads = 512;

int64_t chunks_for(int64_t T) { return (T + kChunk - 1) / kChunk; }

// Block-reduces the per-thread partials and stores them as doubles at out[0, K).
template <int K, int kMaxSlot, typename acc>
__device__ void store_partials(const acc (&sums)[K], double* out) {
  __shared__ acc scratch[32];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const acc total = k == kMaxSlot ? block_reduce<Reduce::Max>(sums[k], scratch)
                                    : block_reduce<Reduce::Sum>(sums[k], scratch);
    if (threadIdx.x == 0) out[k] = double(total);
  }
}

template <int kKL, typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads) policy_loss_kernel(
    const in_t* __restrict__ logprobs, const in_t* __restrict__ old_logprobs,
    const in_t* __restrict__ advantages, bool advantages_per_row, const in_t* __restrict__ weights,
    const in_t* __restrict__ ref_logprobs, const uint8_t* __restrict__ mask, int64_t T, int64_t n_chunks,
    PolicyParams<acc> params, acc* __restrict__ grad, double* __restrict__ partials) {
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

// One block: per-row sums of the chunk partials, the batch's normalisers, the
// per-row gradient scales, the loss and the statistics (see finalize_rows in
// core/loss_agg.h, which this mirrors in parallel).
template <int K, int kMaxSlot, typename acc>
__global__ void __launch_bounds__(kFinalThreads) finalize_kernel(
    const double* __restrict__ partials, int64_t B, int64_t n_chunks, int agg, double given_tokens,
    double given_seqs, double given_norm_length, int64_t T, acc* __restrict__ row_scale, acc* __restrict__ loss,
    acc* __restrict__ stats) {
  __shared__ double scratch[32];
  double totals[K];
  double seqs = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) totals[k] = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double row[K];
#pragma unroll
    for (int k = 0; k < K; ++k) row[k] = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const double* p = partials + (b * n_chunks + c) * K;
#pragma unroll
      for (int k = 0; k < K; ++k) row[k] = k == kMaxSlot ? fmax(row[k], p[k]) : row[k] + p[k];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) totals[k] = k == kMaxSlot ? fmax(totals[k], row[k]) : totals[k] + row[k];
    seqs += row[kSlotTokens] > 0 ? 1.0 : 0.0;
  }
#pragma unroll
  for (int k = 0; k < K; ++k)
    totals[k] = k == kMaxSlot ? block_reduce<Reduce::Max>(totals[k], scratch)
                              : block_reduce<Reduce::Sum>(totals[k], scratch);
  seqs = block_reduce<Reduce::Sum>(seqs, scratch);
  const double tokens = totals[kSlotTokens];
  const AggNorm norm = agg_norm(given_tokens, given_seqs, given_norm_length, tokens, seqs, T);
  double local = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double row_loss = 0, row_tokens = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const double* p = partials + (b * n_chunks + c) * K;
      row_loss += p[kSlotLoss];
      row_tokens += p[kSlotTokens];
    }
    const double scale = agg_row_scale(static_cast<Agg>(agg), row_tokens, norm);
    row_scale[b] = acc(scale);
    local += scale * row_loss;
  }
  const double total = block_reduce<Reduce::Sum>(local, scratch);
  if (threadIdx.x == 0) {
    *loss = acc(total);
#pragma unroll
    for (int k = kFirstStatSlot; k < K; ++k)
      stats[k - kFirstStatSlot] = acc(k == kMaxSlot ? totals[k] : (tokens > 0 ? totals[k] / tokens : 0.0));
    stats[K - kFirstStatSlot] = acc(tokens);
  }
}

template <int kKL, typename in_t, typename acc>
void launch_policy_kernel(const in_t* logprobs, const in_t* old_logprobs, const in_t* advantages,
                          bool advantages_per_row, const in_t* weights, const in_t* ref_logprobs,
                          const uint8_t* mask, int64_t B, int64_t T, const PolicyParams<acc>& params, acc* grad,
                          double* partials, cudaStream_t stream) {
  const int64_t n_chunks = chunks_for(T);
  policy_loss_kernel<kKL, in_t, acc><<<static_cast<unsigned int>(B * n_chunks), kThreads, 0, stream>>>(
      logprobs, old_logprobs, advantages, advantages_per_row, weights, ref_logprobs, mask, T, n_chunks, params,
      grad, partials);
}

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

template <typename out_t, typename acc>
cudaError_t launch_scale_rows(const acc* grad, const acc* row_scale, const acc* grad_loss, int64_t B, int64_t T,
                              out_t* out, cudaStream_t stream) {
  if (B * T == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((B * T + kThreads - 1) / kThreads, int64_t(1) << 16);
  scale_rows_kernel<out_t, acc><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(grad, row_scale, grad_loss,
                                                                                              B, T, out);
  return cudaGetLastError();
}

template <typename in_t, typename acc>
cudaError_t launch_policy_loss(const in_t* logprobs, const in_t* old_logprobs, const in_t* advantages,
                               bool advantages_per_row, const in_t* weights, const in_t* ref_logprobs,
                               const uint8_t* mask, int64_t B, int64_t T, double clip_low, double clip_high,
                               double dual_clip, double log_ratio_clamp, double kl_coef, int kl_kind, int agg,
                               double num_tokens, double num_seqs, double norm_length, acc* grad, acc* row_scale,
                               acc* loss, acc* stats, double* workspace, cudaStream_t stream) {
  PolicyParams<acc> params;
  params.ratio_low = acc(1.0 - clip_low);
  params.ratio_high = acc(1.0 + clip_high);
  params.dual_clip = acc(dual_clip);
  params.log_ratio_clamp = acc(log_ratio_clamp);
  params.kl_coef = acc(kl_coef);
  if (B > 0 && T > 0) {
    switch (static_cast<KLKind>(kl_kind)) {
      case KLKind::none:
        launch_policy_kernel<0>(logprobs, old_logprobs, advantages, advantages_per_row, weights, ref_logprobs,
                                mask, B, T, params, grad, workspace, stream);
        break;
      case KLKind::k1:
        launch_policy_kernel<1>(logprobs, old_logprobs, advantages, advantages_per_row, weights, ref_logprobs,
                                mask, B, T, params, grad, workspace, stream);
        break;
      case KLKind::k2:
        launch_policy_kernel<2>(logprobs, old_logprobs, advantages, advantages_per_row, weights, ref_logprobs,
                                mask, B, T, params, grad, workspace, stream);
        break;
      case KLKind::k3:
        launch_policy_kernel<3>(logprobs, old_logprobs, advantages, advantages_per_row, weights, ref_logprobs,
                                mask, B, T, params, grad, workspace, stream);
        break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  finalize_kernel<kPolicySlots, kPolicyRatioMax, acc><<<1, kFinalThreads, 0, stream>>>(
      workspace, B, chunks_for(T), agg, num_tokens, num_seqs, norm_length, T, row_scale, loss, stats);
  return cudaGetLastError();
}

template <typename in_t, typename acc>
cudaError_t launch_value_loss(const in_t* values, const in_t* old_values, const in_t* returns, const uint8_t* mask,
                              int64_t B, int64_t T, bool has_clip, double clip, int agg, double num_tokens,
                              double num_seqs, double norm_length, acc* grad, acc* row_scale, acc* loss,
                              acc* stats, double* workspace, cudaStream_t stream) {
  const int64_t n_chunks = chunks_for(T);
  if (B > 0 && T > 0) {
    const unsigned int blocks = static_cast<unsigned int>(B * n_chunks);
    if (has_clip) {
      value_loss_kernel<true, in_t, acc><<<blocks, kThreads, 0, stream>>>(values, old_values, returns, mask, T,
                                                                           n_chunks, acc(clip), grad, workspace);
    } else {
      value_loss_kernel<false, in_t, acc><<<blocks, kThreads, 0, stream>>>(values, old_values, returns, mask, T,
                                                                            n_chunks, acc(0), grad, workspace);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  finalize_kernel<kValueSlots, -1, acc><<<1, kFinalThreads, 0, stream>>>(
      workspace, B, n_chunks, agg, num_tokens, num_seqs, norm_length, T, row_scale, loss, stats);
  return cudaGetLastError();
}

#define RLK_INSTANTIATE(in_t, acc)                                                                            \
  template cudaError_t launch_policy_loss<in_t, acc>(                                                         \
      const in_t*, const in_t*, const in_t*, bool, const in_t*, const in_t*, const uint8_t*, int64_t, int64_t, \
      double, double, double, double, double, int, int, double, double, double, acc*, acc*, acc*, acc*,       \
      double*, cudaStream_t);                                                                                 \
  template cudaError_t launch_value_loss<in_t, acc>(const in_t*, const in_t*, const in_t*, const uint8_t*,    \
                                                    int64_t, int64_t, bool, double, int, double, double,      \
                                                    double, acc*, acc*, acc*, acc*, double*, cudaStream_t); \
  template cudaError_t launch_scale_rows<in_t, acc>(const acc*, const acc*, const acc*, int64_t, int64_t, in_t*,  \
                                                    cudaStream_t);
RLK_INSTANTIATE(float, float)
RLK_INSTANTIATE(double, double)
RLK_INSTANTIATE(__half, float)
RLK_INSTANTIATE(__nv_bfloat16, float)
#undef RLK_INSTANTIATE

}  // namespace cuda
}  // namespace rlk
