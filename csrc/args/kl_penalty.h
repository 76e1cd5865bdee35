// kl_penalty: checks, outputs and the one KlPenaltyParams both backends read.
#pragma once
#include <string>

#include "../core/kl_penalty.h"
#include "../torch_common.h"

namespace rlk {

struct KlPenaltyTensors {
  at::Tensor logprobs, ref_logprobs;  // contiguous inputs
  at::Tensor value, slope;            // outputs in the accumulation dtype
};

inline KlPenaltyParams kl_penalty_args(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                       c10::string_view kind, double clamp, KlPenaltyTensors& t) {
  KlPenaltyParams p;
  p.kind = kl_kind_code(std::string(kind).c_str());
  TORCH_CHECK(p.kind >= 0, "kl_penalty: unknown kind '", kind, "'");
  TORCH_CHECK(clamp > 0, "kl_penalty: clamp must be > 0, got ", clamp);
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes() && ref_logprobs.scalar_type() == logprobs.scalar_type() &&
                  ref_logprobs.device() == logprobs.device(),
              "kl_penalty: ref_logprobs must have the shape, dtype and device of logprobs");
  p.dtype = dtype_of(logprobs.scalar_type(), "kl_penalty");
  t.logprobs = logprobs.contiguous();
  t.ref_logprobs = ref_logprobs.contiguous();
  t.value = empty_acc(logprobs.sizes(), logprobs);
  t.slope = empty_acc(logprobs.sizes(), logprobs);
  p.n = t.logprobs.numel();
  p.clamp = clamp;
  p.logprobs = t.logprobs.data_ptr();
  p.ref_logprobs = t.ref_logprobs.data_ptr();
  p.value = t.value.data_ptr();
  p.slope = t.slope.data_ptr();
  return p;
}

}  // namespace rlk
