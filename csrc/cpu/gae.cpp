#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "../core/gae.h"
#include "../args/advantages.h"
#include "simd_loops.h"

namespace rlk {
namespace {

int64_t row_grain(int64_t T) { return cpu::row_grain(T, cpu::kElementsPerTask); }

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& dones,
                                           const c10::optional<at::Tensor>& last_values,
                                           double gamma, double lam) {
  const RolloutArgs args = check_rollout(rewards, values, mask, dones);
  check_last_values(args, rewards, last_values);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const uint8_t* dones_p = args.dones;
  const auto out_dtype = args.out_dtype;
  auto advantages = at::empty({B, T}, rewards.options().dtype(out_dtype));
  auto returns = at::empty({B, T}, rewards.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    const acc* lv = last_values.has_value() ? last_values->data_ptr<acc>() : nullptr;
    acc* adv = advantages.data_ptr<acc>();
    acc* ret = returns.data_ptr<acc>();
    constexpr int64_t R = 4;
    const int64_t blocks = (B + R - 1) / R;
    at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(T) / R), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk * R;
        const int64_t o = b * T;
        if (b + R <= B) {
          const uint8_t* m = mask_p ? mask_p + o : nullptr;
          const uint8_t* d = dones_p ? dones_p + o : nullptr;
          const acc* l = lv ? lv + b : nullptr;
          // Branch-free inner loops for each combination of optional inputs.
          if (m && d)
            gae_rows<R, true, true, scalar_t, acc>(r + o, v + o, m, d, l, T, T, acc(gamma), acc(lam), adv + o, ret + o);
          else if (m)
            gae_rows<R, true, false, scalar_t, acc>(r + o, v + o, m, d, l, T, T, acc(gamma), acc(lam), adv + o, ret + o);
          else if (d)
            gae_rows<R, false, true, scalar_t, acc>(r + o, v + o, m, d, l, T, T, acc(gamma), acc(lam), adv + o, ret + o);
          else
            gae_rows<R, false, false, scalar_t, acc>(r + o, v + o, m, d, l, T, T, acc(gamma), acc(lam), adv + o, ret + o);
          continue;
        }
        for (int64_t row = b; row < B; ++row) {
          const int64_t ro = row * T;
          gae_row<scalar_t, acc>(r + ro, v + ro, mask_p ? mask_p + ro : nullptr,
                                 dones_p ? dones_p + ro : nullptr, lv ? lv[row] : acc(0), T,
                                 acc(gamma), acc(lam), adv + ro, ret + ro);
        }
      }
    });
  });
  return {advantages, returns};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& dones, double gamma) {
  const RolloutArgs args = check_rollout(rewards, c10::nullopt, mask, dones);
  const int64_t B = args.B, T = args.T;
  const uint8_t* mask_p = args.mask;
  const uint8_t* dones_p = args.dones;
  auto returns = at::empty({B, T}, rewards.options().dtype(args.out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "discounted_returns_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    acc* ret = returns.data_ptr<acc>();
    at::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o = b * T;
        discounted_returns_row<scalar_t, acc>(r + o, mask_p ? mask_p + o : nullptr,
                                              dones_p ? dones_p + o : nullptr, T, acc(gamma), ret + o);
      }
    });
  });
  return returns;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("gae", &rlk::gae_cpu);
  m.impl("discounted_returns", &rlk::discounted_returns_cpu);
}
