// The rlkernels._C Python module: importing it registers every op with the
// dispatcher (static initialisers of the TORCH_LIBRARY blocks) and exposes
// build information, and the one Python helper the ops' front ends call per call.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/python.h>
#include <string>

#include "core/logprobs.h"

#ifndef RLK_CUDA_ARCHS
#define RLK_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlkernels compiled kernels";
  m.def("build_info", []() {
    py::dict info;
    py::list backends;
    backends.append("cpu");
#ifdef RLK_WITH_CUDA
    backends.append("cuda");
    info["cuda_archs"] = std::string(RLK_CUDA_ARCHS);
#else
    info["cuda_archs"] = std::string();
#endif
    info["backends"] = backends;
    info["cxx"] = std::string(__VERSION__);
    info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["threads"] = at::get_num_threads();
    info["vocab_chunk"] = static_cast<long>(rlk::kVocabChunk);  // the chunk rule's width (core/logprobs.h)
    return info;
  });
  // The token losses' stats dict {names[i]: stats[i]}: 0-dim tensors sharing the stats
  // vector's storage, made below autograd (the stats take no gradient, and the vector
  // itself never reaches the caller), which costs 2 us against 3.5 for Tensor.unbind's
  // nine tracked views.  Eager, plain tensors only (_token_loss.stats_dict).
  m.def("stat_views", [](const py::tuple& names, const at::Tensor& stats) {
    TORCH_CHECK(stats.dim() == 1 && stats.size(0) == static_cast<int64_t>(names.size()),
                "stat_views: stats must be 1-D with one value per name");
    at::AutoDispatchBelowADInplaceOrView below;
    const int64_t stride = stats.stride(0), offset = stats.storage_offset();
    py::dict out;
    for (int64_t i = 0; i < static_cast<int64_t>(names.size()); ++i) {
      out[names[i]] = py::cast(stats.as_strided({}, {}, offset + i * stride));
    }
    return out;
  });
}
