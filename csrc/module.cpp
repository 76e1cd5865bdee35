// The rlkernels._C Python module: importing it registers every op with the
// dispatcher (static initialisers of the TORCH_LIBRARY blocks) and exposes
// build information.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
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
}
