#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "parallel.h"
#include "../core/gae.h"
#include "../args/gae.h"
#include "simd_loops.h"

namespace rlk {
namespace {

int64_t row_grain(int64_t T) { return cpu::row_grain(T, cpu::kScanElementsPerTask); }

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& dones,
                                           const c10::optional<at::Tensor>& last_values,
                                           double gamma, double lam) {
  at::Tensor advantages, returns;
  const GaeParams p = gae_args(rewards, values, mask, dones, last_values, gamma, lam, advantages, returns);
  const int64_t B = p.B, T = p.T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = static_cast<const scalar_t*>(p.rewards);
    const scalar_t* v = static_cast<const scalar_t*>(p.values);
    const acc* lv = static_cast<const acc*>(p.last_values);
    acc* adv = static_cast<acc*>(p.advantages);
    acc* ret = static_cast<acc*>(p.returns);
    const acc g = acc(p.gamma), l = acc(p.lam);
    constexpr int64_t R = 4;
    const int64_t blocks = (B + R - 1) / R;
    rlk::cpu::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(T) / R), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t b = blk * R;
        const int64_t o = b * T;
        if (b + R <= B) {
          const uint8_t* m = p.mask ? p.mask + o : nullptr;
          const uint8_t* d = p.dones ? p.dones + o : nullptr;
          const acc* lb = lv ? lv + b : nullptr;
          // Branch-free inner loops for each combination of optional inputs.
          if (m && d)
            gae_rows<R, true, true, scalar_t, acc>(r + o, v + o, m, d, lb, T, T, g, l, adv + o, ret + o);
          else if (m)
            gae_rows<R, true, false, scalar_t, acc>(r + o, v + o, m, d, lb, T, T, g, l, adv + o, ret + o);
          else if (d)
            gae_rows<R, false, true, scalar_t, acc>(r + o, v + o, m, d, lb, T, T, g, l, adv + o, ret + o);
          else
            gae_rows<R, false, false, scalar_t, acc>(r + o, v + o, m, d, lb, T, T, g, l, adv + o, ret + o);
          continue;
        }
        for (int64_t row = b; row < B; ++row) {
          const int64_t ro = row * T;
          gae_row<scalar_t, acc>(r + ro, v + ro, p.mask ? p.mask + ro : nullptr, p.dones ? p.dones + ro : nullptr,
                                 lv ? lv[row] : acc(0), T, g, l, adv + ro, ret + ro);
        }
      }
    });
  });
  return {advantages, returns};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& dones, double gamma) {
  at::Tensor returns;
  const GaeParams p = discounted_returns_args(rewards, mask, dones, gamma, returns);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "discounted_returns_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* r = static_cast<const scalar_t*>(p.rewards);
    acc* ret = static_cast<acc*>(p.returns);
    rlk::cpu::parallel_for(0, p.B, row_grain(p.T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o = b * p.T;
        discounted_returns_row<scalar_t, acc>(r + o, p.mask ? p.mask + o : nullptr, p.dones ? p.dones + o : nullptr,
                                              p.T, acc(p.gamma), ret + o);
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
