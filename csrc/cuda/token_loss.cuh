// What the CUDA kernels of policy_loss and value_loss share.  One block per
// (row, chunk of kChunk tokens) evaluates the per-token math and stores the
// chunk's partial sums (p.rows.workspace); one finalising block applies the
// aggregation of core/token_loss.h.  Every reduction runs in a fixed order, so
// results are deterministic.
#pragma once
#include <cuda_runtime_api.h>

#include "../core/token_loss.h"
#include "block_reduce.cuh"

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

// One block: per-row sums of the chunk partials, the batch's normalisers, the
// per-row gradient scales, the loss and the statistics (see finalize_rows in
// core/token_loss.h, which this mirrors in parallel).
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
      // the maximum skips NaN; the sum before it (the same values) keeps it (core/token_loss.h)
      stats[k - kFirstStatSlot] = acc(k == kMaxSlot ? (isnan(totals[k - 1]) ? totals[k - 1] : totals[k])
                                                    : (tokens > 0 ? totals[k] / tokens : 0.0));
    stats[K - kFirstStatSlot] = acc(tokens);
  }
}

// The finalising block of a token loss with K slots (kMaxSlot reduced with max).
template <int K, int kMaxSlot, typename acc>
cudaError_t launch_finalize(const TokenLossParams& r, cudaStream_t stream) {
  finalize_kernel<K, kMaxSlot, acc><<<1, kFinalThreads, 0, stream>>>(
      r.workspace, r.B, chunks_for(r.T), int(r.agg), r.num_tokens, r.num_seqs, r.norm_length, r.T,
      static_cast<acc*>(r.row_scale), static_cast<acc*>(r.loss), static_cast<acc*>(r.stats));
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace rlk
