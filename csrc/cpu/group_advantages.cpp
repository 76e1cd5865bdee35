#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

#include "../core/group_advantages.h"
#include "../args/group_advantages.h"

namespace rlk {
namespace {

// Groups are either contiguous runs of `group_size` or given by `group_index`.
// The ids are checked here, before any is used as an index: the Python layer's
// check does not run under torch.compile or for direct calls.  Two passes over the scores
// (mean, then squared deviations) plus one to write; all sequential: these are
// per-sample scalars, thousands at most.
std::tuple<at::Tensor, at::Tensor> group_advantages_cpu(const at::Tensor& scores,
                                                        const c10::optional<at::Tensor>& group_index,
                                                        int64_t group_size, int64_t num_groups,
                                                        int64_t baseline, int64_t scale, double eps) {
  at::Tensor advantages, all_equal;
  const GroupAdvantagesParams p = group_advantages_args(scores, group_index, group_size, num_groups, baseline, scale,
                                                        eps, advantages, all_equal);
  const int64_t N = p.N;
  const int64_t* index = p.group_index;
  for (int64_t i = 0; index && i < N; ++i)
    TORCH_CHECK(index[i] >= 0 && index[i] < num_groups, "group_advantages: group_index[", i, "] = ", index[i],
                " is outside [0, ", num_groups, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "group_advantages_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* s = static_cast<const scalar_t*>(p.scores);
    auto group_of = [&](int64_t i) { return index ? index[i] : i / group_size; };
    std::vector<acc> sum(num_groups, acc(0)), sq(num_groups, acc(0)), lo(num_groups), hi(num_groups);
    std::vector<int64_t> count(num_groups, 0);
    acc batch_sum = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t g = group_of(i);
      const acc x = cast<acc>(s[i]);
      if (count[g] == 0) lo[g] = hi[g] = x;
      // NaN sticks (x != x), so a group holding NaN is never all-equal
      lo[g] = (x < lo[g] || x != x) ? x : lo[g];
      hi[g] = (x > hi[g] || x != x) ? x : hi[g];
      sum[g] += x;
      count[g] += 1;
      batch_sum += x;
    }
    std::vector<acc> mean(num_groups);
    for (int64_t g = 0; g < num_groups; ++g) mean[g] = count[g] ? sum[g] / acc(count[g]) : acc(0);
    const acc batch_mean = N ? batch_sum / acc(N) : acc(0);
    acc batch_sq = 0;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t g = group_of(i);
      const acc x = cast<acc>(s[i]);
      sq[g] += (x - mean[g]) * (x - mean[g]);
      batch_sq += (x - batch_mean) * (x - batch_mean);
    }
    const acc batch_std = unbiased_std(batch_sq, N);
    acc* adv = static_cast<acc*>(p.advantages);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t g = group_of(i);
      adv[i] = group_advantage<acc>(cast<acc>(s[i]), mean[g], unbiased_std(sq[g], count[g]), batch_std,
                                    count[g], p.baseline, p.scale, acc(p.eps));
    }
    bool* eq = p.all_equal;
    // equal and finite: a group of +-inf scores has NaN advantages, which a skip must not hide
    for (int64_t g = 0; g < num_groups; ++g)
      eq[g] = count[g] == 0 || (lo[g] == hi[g] && lo[g] > -acc(INFINITY) && lo[g] < acc(INFINITY));
  });
  return {advantages, all_equal};
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) { m.impl("group_advantages", &rlk::group_advantages_cpu); }
