// Compiled front ends for the usual call of the costliest public ops (usual_calls.cpp),
// and the token losses' stats dict; bound into rlkernels._C by module.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

namespace rlk::usual {

// {names[i]: stats[i]}: 0-dim tensors sharing the stats vector's storage, made below
// autograd (the stats take no gradient, and the vector itself never reaches the caller),
// which costs 2 us against 3.5 for Tensor.unbind's nine tracked views.
pybind11::dict stat_views(const pybind11::tuple& names, const at::Tensor& stats);

// Binds policy_loss_usual, linear_ppo_loss_usual, linear_logprobs_usual and gossip_mix_usual
// into `m`.
void add_to(pybind11::module_& m);

}  // namespace rlk::usual
