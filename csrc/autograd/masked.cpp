// Autograd of rlkernels::masked_row_mean (Python twin: rlkernels/ops/masked.py,
// _row_mean_backward, the same formula): each valid entry of a row gets the row's
// incoming gradient over the row's valid count.  Written in ATen ops, so a recorded
// backward differentiates through it.
#include "common.h"

namespace rlk::autograd {
namespace {

using ForwardSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&);

at::Tensor forward_op(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  static const auto handle = op<ForwardSig>("rlkernels::masked_row_mean");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(x, mask);
}

struct MaskedRowMean : public torch::autograd::Function<MaskedRowMean> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
    ctx->save_for_backward({mask.value_or(at::Tensor())});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["columns"] = x.sym_size(1);
    return forward_op(x, mask);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    const c10::SymInt columns = ctx->saved_data["columns"].toSymInt();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x;
    if (!mask.defined()) {
      const c10::Scalar divisor = columns > 1 ? c10::Scalar(columns) : c10::Scalar(1);
      grad_x = grad.div(divisor).unsqueeze(1).expand_symint({-1, columns});
    } else {
      // The integer count converts to grad's dtype inside the division (type promotion), as
      // the Python twin's explicit cast does; a scalar 0 needs no tensor of its own.
      const at::Tensor count = mask.sum(1, /*keepdim=*/true).clamp_min_(1);
      grad_x = at::where(mask, grad.unsqueeze(1) / count, 0);
    }
    return {grad_x.to(static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt())), at::Tensor()};
  }
};

at::Tensor masked_row_mean_autograd(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  if (!wants_grad({&x, maybe(mask)})) return forward_op(x, mask);
  return MaskedRowMean::apply(x, mask);
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("masked_row_mean", &rlk::autograd::masked_row_mean_autograd); }
