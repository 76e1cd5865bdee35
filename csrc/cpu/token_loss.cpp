// scale_rows on the CPU, the backward of policy_loss and value_loss: the
// per-token gradient saved by the forward times its row's scale and the
// upstream gradient, in the inputs' dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "parallel.h"
#include "../args/token_loss.h"
#include "simd_loops.h"

namespace rlk {
namespace {

using cpu::row_grain;

template <typename out_t, typename acc>
RLK_CPU_CLONES void scale_row(const acc* __restrict__ grad, acc scale, int64_t n, out_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(grad[i] * scale);
}

at::Tensor scale_rows_cpu(const at::Tensor& grad, const at::Tensor& row_scale, const at::Tensor& grad_loss,
                          at::ScalarType dtype) {
  at::Tensor out, grad_loss_value;
  const ScaleRowsParams p = scale_rows_args(grad, row_scale, grad_loss, dtype, out, grad_loss_value);
  const int64_t B = p.B, T = p.T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc g = *static_cast<const acc*>(p.grad_loss);
    const acc* in = static_cast<const acc*>(p.grad);
    const acc* scale = static_cast<const acc*>(p.row_scale);
    scalar_t* o = static_cast<scalar_t*>(p.out);
    rlk::cpu::parallel_for(0, B, row_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) scale_row<scalar_t, acc>(in + b * T, g * scale[b], T, o + b * T);
    });
  });
  return out;
}

}  // namespace
}  // namespace rlk

TORCH_LIBRARY_IMPL(rlkernels, CPU, m) {
  m.impl("scale_rows", &rlk::scale_rows_cpu);
}
