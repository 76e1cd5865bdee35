// The rlkernels._C Python module: importing it registers every op with the
// dispatcher (static initialisers of the TORCH_LIBRARY blocks) and exposes
// build information, and the compiled helpers the ops' front ends call per call.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>
#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/lm_head.h"
#include "core/logprobs.h"
#include "lm_head/gemm.h"
#include "usual_calls.h"

#ifndef RLK_CUDA_ARCHS
#define RLK_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

// pack_tensors' / unpack_tensors' front-end checks, when they all pass, in one call:
// True only where the Python checks (rlkernels/ops/multi_tensor.py) would pass too:
// plain tensors of one floating dtype on one device, each contiguous (and not a negated or
// conjugate view), none sharing a byte
// with `bucket` other than as its own slice of it, and (for unpack's targets) none with
// another.  False means "not shown": the caller runs the Python checks, which raise the
// exact error (or pass a case this test is too coarse for).
bool multi_tensor_clear(const at::Tensor& bucket, const py::sequence& tensors, bool distinct) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  const auto plain = [](const at::Tensor& t) {
    return t.defined() && t.has_storage() && !t.key_set().has(c10::DispatchKey::Python) &&
           !t.is_meta() && t.is_contiguous() && !t.is_neg() && !t.is_conj();
  };
  if (!plain(bucket)) return false;
  const auto bucket_begin = reinterpret_cast<uintptr_t>(bucket.data_ptr());
  const uintptr_t bucket_end = bucket_begin + bucket.numel() * bucket.element_size();
  int64_t offset = 0;
  std::optional<at::ScalarType> dtype;
  std::optional<c10::Device> device;
  for (const py::handle item : tensors) {
    if (!THPVariable_Check(item.ptr())) return false;
    const at::Tensor t = item.cast<at::Tensor>();
    if (!plain(t) || !at::isFloatingType(t.scalar_type())) return false;
    if (dtype.has_value() && (*dtype != t.scalar_type() || *device != t.device())) return false;
    dtype = t.scalar_type();
    device = t.device();
    const int64_t start = offset;
    offset += t.numel();
    if (t.numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + t.numel() * t.element_size();
    if (t.device() == bucket.device() && begin < bucket_end && bucket_begin < end) {
      // only its own slice, same dtype (the elementwise copy in place)
      if (t.scalar_type() != bucket.scalar_type() || begin != bucket_begin + start * bucket.element_size()) {
        return false;
      }
    }
    if (distinct) spans.emplace_back(begin, end);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

}  // namespace

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
  m.def("multi_tensor_clear", &multi_tensor_clear);
  // The token losses' stats dict (eager, plain tensors only: _token_loss.stats_dict).
  m.def("stat_views", &rlk::usual::stat_views);
  rlk::usual::add_to(m);
  // The lm-head tile rules (core/lm_head.h), for the Python compositions (ops/_chunked.py).
  m.def("chunk_rows", &rlk::lm_head::chunk_rows, py::arg("n"), py::arg("vocab"), py::arg("chunk_size"),
        py::arg("budget"));
  m.def("lm_head_tiles", &rlk::lm_head::tiles, py::arg("n"), py::arg("vocab"), py::arg("budget"));
  // The lm-head matmuls' thread rule (lm_head/gemm.h), for tests and benchmarks: the
  // threads a CPU matmul [m, k] x [k, n] gets (16-bit or not) out of `available`, and
  // what the calling thread's OpenMP setting reads inside such a call and after it
  // (None where torch's OpenMP runtime was not found).
  m.def("gemm_threads", [](int64_t m, int64_t n, int64_t k, bool narrow, int available) {
    return rlk::lm_head::gemm_threads(m, n, k, narrow ? at::kBFloat16 : at::kFloat, available);
  }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("narrow"), py::arg("available"));
  // A `with` block whose CPU matmuls get gemm_threads(...) threads on the calling thread
  // (lm_head/gemm.h), for the Python compositions' matmuls (ops/_chunked.py).
  struct GemmThreadsScope {
    at::Tensor a;
    int64_t m, n, k;
    std::unique_ptr<rlk::lm_head::GemmThreads> held;
  };
  py::class_<GemmThreadsScope>(m, "GemmThreadsScope")
      .def(py::init([](const at::Tensor& a, int64_t m, int64_t n, int64_t k) {
             return GemmThreadsScope{a, m, n, k, nullptr};
           }),
           py::arg("a"), py::arg("m"), py::arg("n"), py::arg("k"))
      .def("__enter__", [](GemmThreadsScope& self) {
        self.held = std::make_unique<rlk::lm_head::GemmThreads>(self.a, self.m, self.n, self.k);
      })
      .def("__exit__", [](GemmThreadsScope& self, py::args) { self.held.reset(); });
  m.def("gemm_threads_probe", [](int64_t m, int64_t n, int64_t k, bool narrow) -> py::object {
    const auto& knobs = rlk::lm_head::thread_knobs();
    if (knobs.omp_get_max_threads == nullptr) return py::none();
    const at::Tensor a = at::empty({0}, at::TensorOptions().dtype(narrow ? at::kBFloat16 : at::kFloat));
    int inside = 0;
    {
      rlk::lm_head::GemmThreads threads(a, m, n, k);
      inside = at::get_num_threads();  // what torch's matmul sees (on a new thread, after its lazy set-up)
    }
    return py::make_tuple(inside, knobs.omp_get_max_threads());
  }, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("narrow"));
}
