// The rlkernels._C Python module: importing it registers every op with the
// dispatcher (static initialisers of the TORCH_LIBRARY blocks) and exposes
// build information.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>

#include "core/lm_head.h"
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
    info["vocab_block"] = static_cast<long>(rlk::lm_head::kVocabBlock);
    info["gemm_rows"] = static_cast<long>(rlk::lm_head::kGemmRows);
    info["chunk_bytes"] = static_cast<long>(rlk::lm_head::kChunkBytes);
    return info;
  });
  // The lm-head tile rules (core/lm_head.h), for the Python compositions (ops/_chunked.py).
  m.def("chunk_rows", &rlk::lm_head::chunk_rows, py::arg("n"), py::arg("vocab"), py::arg("chunk_size"),
        py::arg("budget"));
  m.def("lm_head_tiles", &rlk::lm_head::tiles, py::arg("n"), py::arg("vocab"), py::arg("budget"));
}
