// The bodies of rlkernels::linear_logprobs and rlkernels::linear_logprobs_backward
// (csrc/lm_head/linear_logprobs.cpp), for their autograd (csrc/autograd/linear_logprobs.cpp),
// which calls them directly on plain eager tensors to hand the forward's tiles to the backward.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace rlk::lm_head {

using LinearLogprobsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LinearLogprobsGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// (log-probs, entropies, saved row statistics, is_top1).  With `keep`, the tiles go into
// it when all of them fit the budget at once (keeps_tiles); it stays empty otherwise.
LinearLogprobsOutputs linear_logprobs_body(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                                           double temperature, int64_t ignore_index, bool with_entropy,
                                           bool with_top1, int64_t tile_tokens, int64_t tile_vocab, int64_t budget,
                                           bool drop_ignored, c10::string_view backend,
                                           std::vector<at::Tensor>* keep = nullptr);

// (grad hidden, grad weight, grad bias), empty where not needed.  `kept`: the forward's
// tiles, used instead of recomputing them (and overwritten with the gradient).
LinearLogprobsGrads linear_logprobs_backward_body(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias, const at::Tensor& saved,
    const at::Tensor& entropies, double temperature, int64_t ignore_index, int64_t tile_tokens, int64_t tile_vocab,
    int64_t budget, bool drop_ignored, c10::string_view backend, bool needs_hidden, bool needs_weight,
    bool needs_bias, const std::vector<at::Tensor>* kept = nullptr);

}  // namespace rlk::lm_head
