// Masked row means (one block per row) and masked whitening over a whole
// tensor (one block: two reductions, then an elementwise pass).  Block
// reductions keep both deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/masked_stats.h"
#include "block_reduce.cuh"
#include "launchers.h"

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

template <typename in_t, typename out_t>
cudaError_t launch_masked_row_mean(const in_t* x, const uint8_t* mask, int64_t R, int64_t C, out_t* out,
                                   cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  masked_row_mean_kernel<in_t, out_t><<<static_cast<unsigned int>(R), kThreads, 0, stream>>>(x, mask, C, out);
  return cudaGetLastError();
}

template <typename in_t, typename out_t>
cudaError_t launch_masked_whiten(const in_t* x, const uint8_t* mask, int64_t N, bool shift_mean, double eps,
                                 out_t* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  masked_whiten_kernel<in_t, out_t><<<1, kWhitenThreads, 0, stream>>>(x, mask, N, shift_mean, out_t(eps), out);
  return cudaGetLastError();
}

#define RLK_INSTANTIATE(in_t, out_t)                                                                     \
  template cudaError_t launch_masked_row_mean<in_t, out_t>(const in_t*, const uint8_t*, int64_t, int64_t, \
                                                           out_t*, cudaStream_t);                         \
  template cudaError_t launch_masked_whiten<in_t, out_t>(const in_t*, const uint8_t*, int64_t, bool,      \
                                                         double, out_t*, cudaStream_t);
RLK_INSTANTIATE(float, float)
RLK_INSTANTIATE(double, double)
RLK_INSTANTIATE(__half, float)
RLK_INSTANTIATE(__nv_bfloat16, float)
#undef RLK_INSTANTIATE

}  // namespace cuda
}  // namespace rlk
