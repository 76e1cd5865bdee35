// Group-normalised advantages (GRPO, Dr. GRPO, RLOO): the per-element formula,
// given the statistics of the element's group.
#pragma once
#include "common.h"

namespace rlk {

enum GroupBaseline : int { kBaselineMean = 0, kBaselineLeaveOneOut = 1 };
enum GroupScale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// score s in a group of n members with mean `mean` and (unbiased) std `std`;
// `batch_std` is the unbiased std of all scores.  A group of one has no
// baseline to compare against: its advantage is 0.
template <typename acc>
RLK_INLINE acc group_advantage(acc s, acc mean, acc std, acc batch_std, int64_t n,
                               int baseline, int scale, acc eps) {
  if (n <= 1) return acc(0);
  acc centred = s - mean;
  // Leave-one-out: s - (sum - s)/(n - 1) = n/(n - 1) * (s - mean).
  if (baseline == kBaselineLeaveOneOut) centred *= acc(n) / acc(n - 1);
  if (scale == kScaleGroup) return centred / (std + eps);
  if (scale == kScaleBatch) return centred / (batch_std + eps);
  return centred;
}

// Unbiased standard deviation from a count and the sum of squared deviations.
template <typename acc>
RLK_INLINE acc unbiased_std(acc sq_dev_sum, int64_t n) {
  return n > 1 ? acc(sqrt(sq_dev_sum / acc(n - 1))) : acc(0);
}

// The arguments of group_advantages, filled once by args/group_advantages.h.
// Groups are runs of group_size scores, or given by group_index (ids checked).
struct GroupAdvantagesParams {
  int64_t N = 0, group_size = 0, num_groups = 0;
  Dtype dtype = Dtype::f32;
  const void* scores = nullptr;
  const int64_t* group_index = nullptr;  // may be null
  int baseline = 0;                      // 0 mean, 1 leave-one-out
  int scale = 0;                         // 0 group std, 1 batch std, 2 none
  double eps = 0;
  void* advantages = nullptr;            // [N] in the accumulation type
  bool* all_equal = nullptr;             // [num_groups]
  // CUDA with a group_index: the positions of the scores stably sorted by id,
  // and where each group's run starts in that order (num_groups + 1 entries;
  // ids below 0 come before starts[0], ids past the groups from starts[num_groups])
  const int64_t* order = nullptr;
  const int64_t* starts = nullptr;
  // CUDA with the batch scale: one accumulation-type slot for the batch's std
  void* batch_std = nullptr;
};

// The CUDA launchers (group_advantages.cu).
RLK_CUDA_LAUNCHER(launch_group_advantages, GroupAdvantagesParams)

}  // namespace rlk
