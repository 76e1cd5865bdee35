// Masked row means (one block per row) and masked whitening over a whole
// tensor.  Whitening cuts the values into parts (core/masked.h: at most 1024,
// each a multiple of 8192 values) with a block each, in three launches: the
// parts' sums and counts; every block merges them in part order (so every block
// gets the same mean) and writes its part's squared deviations; every block
// merges those and whitens its part.  Block reductions and the fixed merge order
// keep it deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/masked.h"
#include "block_reduce.cuh"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

// The workspace: per part a count, a sum and a sum of squared deviations.
template <typename acc>
struct WhitenParts {
  long long* counts;
  acc* sums;
  acc* squares;
};

template <typename acc>
__host__ __device__ WhitenParts<acc> whiten_parts_of(int64_t* workspace, int64_t parts) {
  return {reinterpret_cast<long long*>(workspace), reinterpret_cast<acc*>(workspace + parts),
          reinterpret_cast<acc*>(workspace + 2 * parts)};
}

// The block's part [begin, end) of the n values.
struct Part {
  int64_t begin, end;
};

__device__ __forceinline__ Part my_part(int64_t n, int64_t part_size) {
  const int64_t begin = int64_t(blockIdx.x) * part_size;
  return {begin, begin + part_size < n ? begin + part_size : n};
}

// values[0..parts) summed over the block in a fixed order, in every thread.
template <typename T>
__device__ T merge_parts(const T* values, int64_t parts, T* scratch) {
  T v = T(0);
  for (int64_t k = threadIdx.x; k < parts; k += blockDim.x) v += values[k];
  return block_reduce<Reduce::Sum>(v, scratch);
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    whiten_sums_kernel(const in_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t n, int64_t part_size,
                       WhitenParts<acc> parts) {
  __shared__ acc scratch[32];
  __shared__ long long count_scratch[32];
  const Part p = my_part(n, part_size);
  acc sum = 0;
  long long count = 0;
  for (int64_t i = p.begin + threadIdx.x; i < p.end; i += blockDim.x) {
    const bool valid = mask == nullptr || mask[i] != 0;
    sum += valid ? cast<acc>(x[i]) : acc(0);
    count += valid ? 1 : 0;
  }
  sum = block_reduce<Reduce::Sum>(sum, scratch);
  count = block_reduce<Reduce::Sum>(count, count_scratch);
  if (threadIdx.x == 0) {
    parts.sums[blockIdx.x] = sum;
    parts.counts[blockIdx.x] = count;
  }
}

// The mean of every valid value, and their count, the same bits in every block.
template <typename acc>
__device__ acc whiten_mean(const WhitenParts<acc>& parts, int64_t count_parts, long long& count) {
  __shared__ acc scratch[32];
  __shared__ long long count_scratch[32];
  const acc sum = merge_parts(parts.sums, count_parts, scratch);
  count = merge_parts(parts.counts, count_parts, count_scratch);
  return count > 0 ? sum / acc(count) : acc(0);
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    whiten_squares_kernel(const in_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t n,
                          int64_t part_size, WhitenParts<acc> parts) {
  __shared__ acc scratch[32];
  long long count;
  const acc mean = whiten_mean(parts, gridDim.x, count);
  const Part p = my_part(n, part_size);
  acc sq = 0;
  for (int64_t i = p.begin + threadIdx.x; i < p.end; i += blockDim.x) {
    const acc d = cast<acc>(x[i]) - mean;
    sq += (mask == nullptr || mask[i] != 0) ? d * d : acc(0);
  }
  sq = block_reduce<Reduce::Sum>(sq, scratch);
  if (threadIdx.x == 0) parts.squares[blockIdx.x] = sq;
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    whiten_write_kernel(const in_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t n, int64_t part_size,
                        WhitenParts<acc> parts, bool shift_mean, acc eps, acc* __restrict__ out) {
  __shared__ acc scratch[32];
  long long count;
  const acc mean = whiten_mean(parts, gridDim.x, count);
  const acc sq = merge_parts(parts.squares, int64_t(gridDim.x), scratch);
  const WhitenCoef<acc> c = whiten_coefficients<acc>(mean, sq, static_cast<int64_t>(count), shift_mean, eps);
  const Part p = my_part(n, part_size);
  for (int64_t i = p.begin + threadIdx.x; i < p.end; i += blockDim.x)
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
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t n = p.cols, part_size = whiten_part_size(n);
  const unsigned int blocks = static_cast<unsigned int>(whiten_parts(n));
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    const in_t* x = static_cast<const in_t*>(p.x);
    const WhitenParts<out_t> parts = whiten_parts_of<out_t>(p.workspace, blocks);
    whiten_sums_kernel<in_t, out_t><<<blocks, kThreads, 0, stream>>>(x, p.mask, n, part_size, parts);
    whiten_squares_kernel<in_t, out_t><<<blocks, kThreads, 0, stream>>>(x, p.mask, n, part_size, parts);
    whiten_write_kernel<in_t, out_t><<<blocks, kThreads, 0, stream>>>(x, p.mask, n, part_size, parts, p.shift_mean,
                                                                     out_t(p.eps), static_cast<out_t*>(p.out));
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
  MaskedParams p = masked_whiten_args(x, mask, shift_mean, eps, out);
  const at::Tensor workspace = at::empty({3 * whiten_parts(p.cols)}, x.options().dtype(at::kLong));
  p.workspace = workspace.data_ptr<int64_t>();
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
