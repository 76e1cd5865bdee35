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
