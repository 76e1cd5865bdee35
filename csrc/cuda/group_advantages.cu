// Group advantages on the GPU: one block per group, reading only its members.
// Runs of group_size are contiguous; with a group_index the torch side sorts the
// positions by id once (stable, so members keep their order) and each block
// reads its run of that order, so the work is O(N) however many groups there
// are.  The batch's std (scale "batch") is computed once by a block of its own.
// Block reductions over a fixed member order make it deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/group_advantages.h"
#include "block_reduce.cuh"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBatchThreads = 1024;

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kBatchThreads)
    batch_std_kernel(const in_t* __restrict__ scores, int64_t N, acc* __restrict__ batch_std) {
  __shared__ acc scratch[32];
  acc sum = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) sum += cast<acc>(scores[i]);
  const acc mean = N > 0 ? block_reduce<Reduce::Sum>(sum, scratch) / acc(N) : acc(0);
  acc sq = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc d = cast<acc>(scores[i]) - mean;
    sq += d * d;
  }
  sq = block_reduce<Reduce::Sum>(sq, scratch);
  if (threadIdx.x == 0) *batch_std = unbiased_std(sq, N);
}

template <typename in_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    group_advantages_kernel(const in_t* __restrict__ scores, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ starts, int64_t N, int64_t group_size, int baseline,
                            int scale, acc eps, const acc* __restrict__ batch_std, acc* __restrict__ advantages,
                            bool* __restrict__ all_equal) {
  __shared__ acc scratch[32];
  const int64_t g = blockIdx.x;
  // members k in [begin, end) of the order, at positions position(k)
  const int64_t begin = order ? starts[g] : g * group_size;
  const int64_t end = order ? starts[g + 1] : begin + group_size;
  auto position = [&](int64_t k) { return order ? order[k] : k; };
  acc sum = 0, lo = 0, hi = 0, nans = 0;
  bool first = true;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const acc x = cast<acc>(scores[position(k)]);
    sum += x;
    nans += x != x ? acc(1) : acc(0);
    lo = first || x < lo ? x : lo;
    hi = first || x > hi ? x : hi;
    first = false;
  }
  sum = block_reduce<Reduce::Sum>(sum, scratch);
  // Threads that saw no member contribute a neutral element to min/max.
  const acc big = acc(3.0e38);
  lo = block_reduce<Reduce::Min>(first ? big : lo, scratch);
  hi = block_reduce<Reduce::Max>(first ? -big : hi, scratch);
  // min/max reductions may drop NaN; a group holding NaN is never all-equal
  const bool has_nan = block_reduce<Reduce::Sum>(nans, scratch) > acc(0);
  const int64_t members = end - begin;
  const acc mean = members > 0 ? sum / acc(members) : acc(0);
  acc sq = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const acc d = cast<acc>(scores[position(k)]) - mean;
    sq += d * d;
  }
  sq = block_reduce<Reduce::Sum>(sq, scratch);
  const acc std = unbiased_std(sq, members);
  const acc b_std = scale == kScaleBatch ? *batch_std : acc(0);
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t i = position(k);
    advantages[i] = group_advantage<acc>(cast<acc>(scores[i]), mean, std, b_std, members, baseline, scale, eps);
  }
  // Ids outside [0, num_groups) belong to no block: block 0 flags them with NaN
  // (ids are data; reading them on the host would synchronise).
  if (order && g == 0) {
    for (int64_t k = threadIdx.x; k < starts[0]; k += blockDim.x) advantages[order[k]] = acc(NAN);
    for (int64_t k = starts[gridDim.x] + threadIdx.x; k < N; k += blockDim.x) advantages[order[k]] = acc(NAN);
  }
  // equal and finite: a group of +-inf scores has NaN advantages, which a skip must not hide
  if (threadIdx.x == 0)
    all_equal[g] = members == 0 || (lo == hi && !has_nan && lo > -acc(INFINITY) && lo < acc(INFINITY));
}

}  // namespace

cudaError_t launch_group_advantages(const GroupAdvantagesParams& p, cudaStream_t stream) {
  if (p.num_groups == 0) return cudaSuccess;
  if ((p.group_index != nullptr && (p.order == nullptr || p.starts == nullptr)) ||
      (p.scale == kScaleBatch && p.batch_std == nullptr))
    return cudaErrorInvalidValue;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    const in_t* scores = static_cast<const in_t*>(p.scores);
    if (p.scale == kScaleBatch)
      batch_std_kernel<in_t, out_t><<<1, kBatchThreads, 0, stream>>>(scores, p.N, static_cast<out_t*>(p.batch_std));
    group_advantages_kernel<in_t, out_t><<<static_cast<unsigned int>(p.num_groups), kThreads, 0, stream>>>(
        scores, p.group_index ? p.order : nullptr, p.starts, p.N, p.group_size, p.baseline, p.scale, out_t(p.eps),
        static_cast<const out_t*>(p.batch_std), static_cast<out_t*>(p.advantages), p.all_equal);
  });
}

}  // namespace cuda
}  // namespace rlk

// ---------------------------------------------------------------------------
// Torch side: the registered ops, which check their arguments (args/group_advantages.h),
// launch on the current stream and turn a failed launch into an error.  Only
// the extension build compiles it: torch.utils.cpp_extension passes
// -DTORCH_EXTENSION_NAME to nvcc, plain nvcc (the torch-free CMake check) does
// not, so this file also builds without torch.
#ifdef TORCH_EXTENSION_NAME
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>

#include <limits>

#include "../args/group_advantages.h"
#include "torch_launch.h"

namespace rlk {
namespace {

std::tuple<at::Tensor, at::Tensor> group_advantages_cuda(const at::Tensor& scores,
                                                         const c10::optional<at::Tensor>& group_index,
                                                         int64_t group_size, int64_t num_groups,
                                                         int64_t baseline, int64_t scale, double eps) {
  c10::cuda::CUDAGuard guard(scores.device());
  // Group ids are not range-checked here (a device read would synchronise); the
  // kernel only compares them with its own group's id.
  at::Tensor advantages, all_equal;
  GroupAdvantagesParams p = group_advantages_args(scores, group_index, group_size, num_groups, baseline, scale,
                                                        eps, advantages, all_equal);
  // The members of each group: positions stably sorted by id, and each group's
  // first place in that order (device work only: nothing waits on the ids).
  at::Tensor order, starts, batch_std;
  if (p.group_index != nullptr && p.num_groups > 0) {
    at::Tensor sorted;
    std::tie(sorted, order) = at::sort(*group_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    starts = at::searchsorted(sorted, at::arange(p.num_groups + 1, group_index->options()));
    p.order = order.data_ptr<int64_t>();
    p.starts = starts.data_ptr<int64_t>();
  }
  if (p.scale == kScaleBatch) {
    batch_std = at::empty({1}, advantages.options());
    p.batch_std = batch_std.data_ptr();
  }
  if (p.num_groups == 0) {
    // No group to launch a block for: every id lies outside [0, 0), so every score gets
    // the NaN a stray id gets (never the uninitialised output).
    advantages.fill_(std::numeric_limits<double>::quiet_NaN());
    return {advantages, all_equal};
  }
  C10_CUDA_CHECK(cuda::launch_group_advantages(p, current_stream()));
  return {advantages, all_equal};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CUDA, m) { m.impl("group_advantages", &rlk::group_advantages_cuda); }
#endif  // TORCH_EXTENSION_NAME
