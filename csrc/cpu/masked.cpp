#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "parallel.h"
#include "../core/masked.h"
#include "../args/masked.h"
#include "simd_loops.h"

namespace rlk {
namespace {

at::Tensor masked_row_mean_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  at::Tensor out;
  const MaskedParams p = masked_row_mean_args(x, mask, out);
  const int64_t R = p.rows, C = p.cols;
  const uint8_t* m = p.mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_row_mean_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = static_cast<const scalar_t*>(p.x);
    acc* op = static_cast<acc*>(p.out);
    rlk::cpu::parallel_for(0, R, cpu::row_grain(C, cpu::kElementsPerTask),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const MaskedSums<acc> s = masked_sums<scalar_t, acc>(xp + r * C, m ? m + r * C : nullptr, C);
        op[r] = s.count > 0 ? s.sum / acc(s.count) : acc(0);
      }
    });
  });
  return out;
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask, bool shift_mean,
                             double eps) {
  at::Tensor out;
  const MaskedParams p = masked_whiten_args(x, mask, shift_mean, eps, out);
  const int64_t N = p.cols;
  const uint8_t* m = p.mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_whiten_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = static_cast<const scalar_t*>(p.x);
    // Fixed-size chunks whose partial sums are added in chunk order: the result
    // does not depend on the number of threads.
    constexpr int64_t kChunk = int64_t(1) << 15;
    const int64_t chunks = (N + kChunk - 1) / kChunk;
    std::vector<MaskedSums<acc>> partial(chunks);
    std::vector<acc> partial_sq(chunks);
    rlk::cpu::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t lo = k * kChunk, n = std::min(kChunk, N - lo);
        partial[k] = masked_sums<scalar_t, acc>(xp + lo, m ? m + lo : nullptr, n);
      }
    });
    MaskedSums<acc> s{acc(0), 0};
    for (const auto& p : partial) {
      s.sum += p.sum;
      s.count += p.count;
    }
    const acc mean = s.count > 0 ? s.sum / acc(s.count) : acc(0);
    rlk::cpu::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t lo = k * kChunk, n = std::min(kChunk, N - lo);
        partial_sq[k] = masked_sq_dev<scalar_t, acc>(xp + lo, m ? m + lo : nullptr, n, mean);
      }
    });
    acc sq = 0;
    for (acc p : partial_sq) sq += p;
    const WhitenCoef<acc> c = whiten_coefficients<acc>(mean, sq, s.count, p.shift_mean, acc(p.eps));
    acc* op = static_cast<acc*>(p.out);
    rlk::cpu::parallel_for(0, N, 4 * kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) op[i] = whiten_value<acc>(cast<acc>(xp[i]), m == nullptr || m[i], c);
    });
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("masked_row_mean", &rlk::masked_row_mean_cpu);
  m.impl("masked_whiten", &rlk::masked_whiten_cpu);
}
