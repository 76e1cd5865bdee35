// Group advantages on the GPU: one block per group.  With a group_index each
// block scans all N scores and keeps its own (N is the number of sampled
// completions, thousands at most); block reductions make it deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/group_advantages.h"
#include "block_reduce.cuh"
#include "dispatch.cuh"

namespace rlk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename in_t, typename acc>
__global__ void group_advantages_kernel(const in_t* __restrict__ scores, const int64_t* __restrict__ index,
                                        int64_t N, int64_t group_size, int baseline, int scale, acc eps,
                                        acc* __restrict__ advantages, bool* __restrict__ all_equal) {
  __shared__ acc scratch[32];
  const int64_t g = blockIdx.x;
  const int64_t begin = index ? 0 : g * group_size;
  const int64_t end = index ? N : begin + group_size;
  acc sum = 0, lo = 0, hi = 0, count = 0, nans = 0;
  bool first = true;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (index && index[i] != g) continue;
    const acc x = cast<acc>(scores[i]);
    sum += x;
    count += 1;
    nans += x != x ? acc(1) : acc(0);
    lo = first || x < lo ? x : lo;
    hi = first || x > hi ? x : hi;
    first = false;
  }
  sum = block_reduce<Reduce::Sum>(sum, scratch);
  const acc n = block_reduce<Reduce::Sum>(count, scratch);
  // Threads that saw no member contribute a neutral element to min/max.
  const acc big = acc(3.0e38);
  lo = block_reduce<Reduce::Min>(first ? big : lo, scratch);
  hi = block_reduce<Reduce::Max>(first ? -big : hi, scratch);
  // min/max reductions may drop NaN; a group holding NaN is never all-equal
  const bool has_nan = block_reduce<Reduce::Sum>(nans, scratch) > acc(0);
  const acc mean = n > 0 ? sum / n : acc(0);

  acc sq = 0, batch_sum = 0;
  if (scale == kScaleBatch)
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) batch_sum += cast<acc>(scores[i]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (index && index[i] != g) continue;
    const acc d = cast<acc>(scores[i]) - mean;
    sq += d * d;
  }
  sq = block_reduce<Reduce::Sum>(sq, scratch);
  acc batch_std = 0;
  if (scale == kScaleBatch) {
    const acc batch_mean = N > 0 ? block_reduce<Reduce::Sum>(batch_sum, scratch) / acc(N) : acc(0);
    acc batch_sq = 0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const acc d = cast<acc>(scores[i]) - batch_mean;
      batch_sq += d * d;
    }
    batch_std = unbiased_std(block_reduce<Reduce::Sum>(batch_sq, scratch), N);
  }
  const int64_t members = static_cast<int64_t>(n);
  const acc std = unbiased_std(sq, members);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (index && index[i] != g) {
      // An id outside [0, num_groups) belongs to no block: the first one flags it
      // (ids are data; reading them on the host would synchronise).
      if (g == 0 && (index[i] < 0 || index[i] >= static_cast<int64_t>(gridDim.x))) advantages[i] = acc(NAN);
      continue;
    }
    advantages[i] = group_advantage<acc>(cast<acc>(scores[i]), mean, std, batch_std, members, baseline,
                                         scale, eps);
  }
  // equal and finite: a group of +-inf scores has NaN advantages, which a skip must not hide
  if (threadIdx.x == 0)
    all_equal[g] = members == 0 || (lo == hi && !has_nan && lo > -acc(INFINITY) && lo < acc(INFINITY));
}

}  // namespace

cudaError_t launch_group_advantages(const GroupAdvantagesParams& p, cudaStream_t stream) {
  if (p.num_groups == 0) return cudaSuccess;
  return launch_typed(p.dtype, [&](auto tag) {
    using in_t = decltype(tag);
    using out_t = acc_t<in_t>;
    group_advantages_kernel<in_t, out_t><<<static_cast<unsigned int>(p.num_groups), kThreads, 0, stream>>>(
        static_cast<const in_t*>(p.scores), p.group_index, p.N, p.group_size, p.baseline, p.scale, out_t(p.eps),
        static_cast<out_t*>(p.advantages), p.all_equal);
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
  const GroupAdvantagesParams p = group_advantages_args(scores, group_index, group_size, num_groups, baseline, scale,
                                                        eps, advantages, all_equal);
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
