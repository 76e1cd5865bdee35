#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "parallel.h"
#include "../core/masked.h"
#include "../args/masked.h"
#include "masked_sum.h"

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
    rlk::cpu::parallel_for(0, R, cpu::row_grain(C, cpu::kValuesPerTask),
                     [&](int64_t begin, int64_t end) {
      alignas(64) acc staging[cpu::kChunk];
      for (int64_t r = begin; r < end; ++r) {
        int64_t count = 0;
        const double total = cpu::row_sum<acc>(xp + r * C, m ? m + r * C : nullptr, C, staging, &count);
        op[r] = count > 0 ? acc(total / double(count)) : acc(0);
      }
    });
  });
  return out;
}

// out[i] = whiten_value(x[i]) where mask[i], else 0: a select, not a branch (a random
// mask mispredicts a third of the branches, ten times the loop's own cost).
template <typename acc, typename scalar_t>
RLK_CPU_CLONES void whiten_span(const scalar_t* __restrict__ x, const uint8_t* __restrict__ mask, int64_t n,
                                WhitenCoef<acc> c, acc* __restrict__ out) {
  if (mask == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = whiten_value<acc>(cast<acc>(x[i]), true, c);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = keep_if(mask[i] != 0, whiten_value<acc>(cast<acc>(x[i]), true, c));
  }
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
    // (each chunk's sums in fixed lanes: cpu/masked_sum.h)
    std::vector<double> partial(chunks), partial_sq(chunks);
    std::vector<int64_t> partial_count(chunks, 0);
    const int64_t grain = std::max<int64_t>(1, cpu::kValuesPerTask / kChunk);
    rlk::cpu::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc staging[cpu::kChunk];
      for (int64_t k = begin; k < end; ++k) {
        const int64_t lo = k * kChunk, n = std::min(kChunk, N - lo);
        partial[k] = cpu::row_sum<acc>(xp + lo, m ? m + lo : nullptr, n, staging, &partial_count[k]);
      }
    });
    double sum = 0;
    int64_t count = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sum += partial[k];
      count += partial_count[k];
    }
    const acc mean = count > 0 ? acc(sum / double(count)) : acc(0);
    rlk::cpu::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc staging[cpu::kChunk];
      for (int64_t k = begin; k < end; ++k) {
        const int64_t lo = k * kChunk, n = std::min(kChunk, N - lo);
        partial_sq[k] = cpu::row_sq_dev<acc>(xp + lo, m ? m + lo : nullptr, n, mean, staging);
      }
    });
    double sq = 0;
    for (double part : partial_sq) sq += part;
    const WhitenCoef<acc> c = whiten_coefficients<acc>(mean, acc(sq), count, p.shift_mean, acc(p.eps));
    acc* op = static_cast<acc*>(p.out);
    rlk::cpu::parallel_for(0, N, cpu::kValuesPerTask, [&](int64_t begin, int64_t end) {
      whiten_span<acc>(xp + begin, m == nullptr ? nullptr : m + begin, end - begin, c, op + begin);
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
