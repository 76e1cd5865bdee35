// Autograd of rlkernels::linear_logprobs, for every backend ("cpu", "cuda", "triton": the
// op's body picks the tile kernels).  Backward: the op linear_logprobs_backward (the
// tiles recomputed), or, when the forward ran on plain eager tensors and all its tiles fit
// the budget (keeps_tiles, csrc/core/lm_head.h), the backward body on the forward's tiles
// (three matmuls instead of four).  Recorded (double) backward through the reference.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "../lm_head/linear_logprobs.h"
#include "common.h"

namespace rlk::autograd {
namespace {

using lm_head::LinearLogprobsGrads;
using lm_head::LinearLogprobsOutputs;
using ForwardSig = LinearLogprobsOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, int64_t, bool, bool, int64_t,
                                         int64_t, int64_t, bool, c10::string_view);
using BackwardSig = LinearLogprobsGrads(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t,
                                        int64_t, bool, c10::string_view, bool, bool, bool);

// Whether the body may run here directly, keeping its tiles for the backward: plain CPU or
// CUDA tensors, no dispatch mode (fake tensors, torch.compile's tracing, FlopCounterMode)
// and no functorch transform.  Elsewhere the op runs, so that traces and modes see it.
bool plain(std::initializer_list<const at::Tensor*> tensors) {
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                     c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Conjugate,
                                     c10::DispatchKey::Negative});
  if (c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    if (!(t->is_cpu() || t->is_cuda()) || t->key_set().has_any(wrapped)) return false;
  }
  return true;
}

LinearLogprobsOutputs forward_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& bias, double temperature, int64_t ignore_index,
                                 bool with_entropy, bool with_top1, int64_t tile_tokens, int64_t tile_vocab,
                                 int64_t budget, bool drop_ignored, c10::string_view backend) {
  static const auto handle = op<ForwardSig>("rlkernels::linear_logprobs");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1, tile_tokens,
                     tile_vocab, budget, drop_ignored, backend);
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct LinearLogprobs : public torch::autograd::Function<LinearLogprobs> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& labels, const std::optional<at::Tensor>& bias, double temperature,
                               int64_t ignore_index, bool with_entropy, bool with_top1, int64_t tile_tokens,
                               int64_t tile_vocab, int64_t budget, bool drop_ignored, std::string backend) {
    std::vector<at::Tensor> kept;
    LinearLogprobsOutputs outputs;
    if (plain({&hidden, &weight, &labels, maybe(bias)})) {
      at::AutoDispatchBelowADInplaceOrView below;
      outputs = lm_head::linear_logprobs_body(hidden, weight, labels, bias, temperature, ignore_index,
                                              with_entropy, with_top1, tile_tokens, tile_vocab, budget, drop_ignored,
                                              backend, &kept);
    } else {
      outputs = forward_op(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1,
                           tile_tokens, tile_vocab, budget, drop_ignored, backend);
    }
    auto [values, entropies, saved, top1] = outputs;
    ctx->save_for_backward({hidden, weight, labels, bias.value_or(at::Tensor()), saved, entropies});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["tile_tokens"] = tile_tokens;
    ctx->saved_data["tile_vocab"] = tile_vocab;
    ctx->saved_data["budget"] = budget;
    ctx->saved_data["drop_ignored"] = drop_ignored;
    ctx->saved_data["backend"] = backend;
    // an intermediate of the op, not an input or output; used once (the backward
    // overwrites the tiles), so a second backward through the graph recomputes
    ctx->saved_data["kept"] = c10::List<at::Tensor>(kept);
    ctx->mark_non_differentiable({saved, top1});
    ctx->set_materialize_grads(false);
    return {values, entropies, saved, top1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(13);
    // (needs_input_grad counts the tensor inputs only: bias, the fourth, is one when given)
    const variable_list saved_tensors = ctx->get_saved_variables();
    const bool needs_hidden = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
    const bool needs_bias = saved_tensors[3].defined() && ctx->needs_input_grad(3);
    if (!(needs_hidden || needs_weight || needs_bias)) return out;
    const at::Tensor& hidden = saved_tensors[0];
    const at::Tensor& weight = saved_tensors[1];
    const at::Tensor& labels = saved_tensors[2];
    const at::Tensor& bias = saved_tensors[3];
    const at::Tensor& saved = saved_tensors[4];
    const at::Tensor& entropies = saved_tensors[5];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    // (log-probs and entropies have labels' shape, entropies [0] without entropy)
    const c10::SymInt N = labels.sym_numel();
    const at::Tensor grad_logprobs =
        grads[0].defined() ? grads[0].to(at::kFloat).contiguous()
                           : at::zeros_symint(labels.sym_sizes(), hidden.options().dtype(at::kFloat));
    const bool with_entropy = grads[1].defined() && entropies.sym_numel() == N && N > 0;
    std::optional<at::Tensor> grad_entropy;
    if (with_entropy) grad_entropy = grads[1].to(at::kFloat).contiguous();
    if (recording()) {
      const variable_list result = python_backward(
          "linear_logprobs", grad_logprobs, with_entropy ? *grad_entropy : at::Tensor(), hidden, weight, labels, bias,
          temperature, ignore_index, with_entropy, needs_hidden, needs_weight, needs_bias);
      out[0] = result[0];
      out[1] = result[1];
      out[3] = result[2];
      return out;
    }
    const int64_t tile_tokens = ctx->saved_data["tile_tokens"].toInt();
    const int64_t tile_vocab = ctx->saved_data["tile_vocab"].toInt();
    const int64_t budget = ctx->saved_data["budget"].toInt();
    const bool drop_ignored = ctx->saved_data["drop_ignored"].toBool();
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const std::vector<at::Tensor> kept = ctx->saved_data["kept"].toTensorVector();
    ctx->saved_data["kept"] = c10::List<at::Tensor>();
    at::AutoDispatchBelowADInplaceOrView below;
    LinearLogprobsGrads result;
    if (!kept.empty()) {
      result = lm_head::linear_logprobs_backward_body(grad_logprobs, grad_entropy, hidden, weight, labels,
                                                      optional(bias), saved, entropies, temperature, ignore_index,
                                                      tile_tokens, tile_vocab, budget, drop_ignored, backend,
                                                      needs_hidden, needs_weight, needs_bias, &kept);
    } else {
      static const auto backward_op = op<BackwardSig>("rlkernels::linear_logprobs_backward");
      result = backward_op.call(grad_logprobs, grad_entropy, hidden, weight, labels, optional(bias), saved, entropies,
                                temperature, ignore_index, tile_tokens, tile_vocab, budget, drop_ignored, backend,
                                needs_hidden, needs_weight, needs_bias);
    }
    if (needs_hidden) out[0] = std::get<0>(result);
    if (needs_weight) out[1] = std::get<1>(result);
    if (needs_bias && bias.defined()) out[3] = std::get<2>(result);
    return out;
  }
};

LinearLogprobsOutputs linear_logprobs_autograd(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                                               double temperature, int64_t ignore_index, bool with_entropy,
                                               bool with_top1, int64_t tile_tokens, int64_t tile_vocab, int64_t budget,
                                               bool drop_ignored, c10::string_view backend) {
  if (!wants_grad({&hidden, &weight, maybe(bias)})) {
    return forward_op(hidden, weight, labels, bias, temperature, ignore_index, with_entropy, with_top1, tile_tokens,
                      tile_vocab, budget, drop_ignored, backend);
  }
  auto out = LinearLogprobs::apply(hidden, weight, labels, bias, temperature, ignore_index,
                                   with_entropy, with_top1, tile_tokens, tile_vocab, budget, drop_ignored,
                                   std::string(backend));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rlk::autograd

TORCH_LIBRARY_IMPL(rlkernels, Autograd, m) { m.impl("linear_logprobs", &rlk::autograd::linear_logprobs_autograd); }
