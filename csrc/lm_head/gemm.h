// The lm-head bodies' matmuls (csrc/lm_head/), each run on as many threads as its work
// is worth: a thread joins a CPU matmul only for about half a millisecond of work of
// its own (issue 13, goal 3).
//
// Why: torch's CPU matmuls (MKL for float32, oneDNN for 16-bit) open an OpenMP region
// on every thread the caller has, however small the product.  On a machine whose cores
// are busy (a data loader, another job) such a region waits for a worker the OS has
// not scheduled: measured on the 2-core development machine with one spinning process
// per core, the three matmuls of linear_logprobs at 64 tokens x 64 x 8192 took 2.6 ms
// on one thread and 45 ms on two.  The thread count is the calling thread's own: the
// OpenMP `nthreads` setting and MKL's thread-local one are per thread, set for the
// call and put back after it, so other threads and the caller's later work are not
// touched (torch.set_num_threads would change a process-wide default).  The two
// setters are looked up once in the libtorch this extension links (its OpenMP runtime
// and MKL); a torch without them runs every matmul as before.
//
// Bits: a token's logits must not depend on its batch (docs/numerics.md), and the
// thread count now does.  MKL and oneDNN gave the same bits on one thread and on two for
// every lm-head product tried (16 to 2048 rows); tests/test_gemm_threads.py checks a
// token's log-probs and gradients from a one-thread matmul against a two-thread one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace rlk::lm_head {

// Multiply-adds x 2 one thread does in about 0.5 ms (measured one-thread rates on the
// development machine: ~100 GFLOP/s float32 via MKL, ~430 GFLOP/s bfloat16 via oneDNN;
// benchmarks/busy.py times the effect).
inline double gemm_flops_per_thread(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? 2.0e8 : 5.0e7;
}

// The threads a CPU matmul [m, k] x [k, n] of `dtype` gets when the caller has
// `available`: one per gemm_flops_per_thread of work, at least one, at most available.
inline int gemm_threads(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, int available) {
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const double worth = flops / gemm_flops_per_thread(dtype);
  return static_cast<int>(std::clamp<double>(worth, 1.0, std::max(available, 1)));
}

// The calling thread's OpenMP and MKL thread settings, from the libraries torch uses.
struct ThreadKnobs {
  int (*omp_get_max_threads)() = nullptr;
  void (*omp_set_num_threads)(int) = nullptr;
  int (*mkl_set_num_threads_local)(int) = nullptr;  // returns the previous local setting
  int (*mkl_get_max_threads)() = nullptr;
};

inline const ThreadKnobs& thread_knobs() {
  static const ThreadKnobs knobs = [] {
    ThreadKnobs k;
#if defined(__unix__) || defined(__APPLE__)
    // libtorch_cpu: the library at::mm runs in; a lookup through its handle finds the
    // OpenMP runtime it was linked with (its own copy in a wheel), not another one.
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
      if (void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
        k.omp_get_max_threads = reinterpret_cast<int (*)()>(dlsym(lib, "omp_get_max_threads"));
        k.omp_set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(lib, "omp_set_num_threads"));
        // (MKL's C entry; the lower-case names are its Fortran ones, which take a pointer)
        k.mkl_set_num_threads_local = reinterpret_cast<int (*)(int)>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
        k.mkl_get_max_threads = reinterpret_cast<int (*)()>(dlsym(lib, "MKL_Get_Max_Threads"));
        dlclose(lib);  // the NOLOAD reference only: torch keeps the library loaded
      }
    }
#endif
    if (k.omp_get_max_threads == nullptr || k.omp_set_num_threads == nullptr) k = ThreadKnobs{};
    return k;
  }();
  return knobs;
}

// For its lifetime, the calling thread's matmuls run on gemm_threads(...) threads.
class GemmThreads {
 public:
  GemmThreads(const at::Tensor& a, int64_t m, int64_t n, int64_t k) {
    if (!a.device().is_cpu()) return;
    const ThreadKnobs& knobs = thread_knobs();
    if (knobs.omp_set_num_threads == nullptr) return;
    // (torch sets a thread's OpenMP count on the thread's first parallel call: make that
    // happen now, or it would overwrite the lowered count inside at::mm)
    at::get_num_threads();
    // (MKL's own count can be lower than OpenMP's where MKL's API set it: never raise it)
    const int omp = knobs.omp_get_max_threads();
    const int mkl = knobs.mkl_get_max_threads != nullptr ? knobs.mkl_get_max_threads() : omp;
    const int available = std::min(omp, mkl);
    const int want = gemm_threads(m, n, k, a.scalar_type(), available);
    if (want >= available) return;
    saved_omp_ = omp;
    knobs.omp_set_num_threads(want);
    if (knobs.mkl_set_num_threads_local != nullptr) {
      saved_mkl_ = knobs.mkl_set_num_threads_local(want);
      set_mkl_ = true;
    }
  }
  ~GemmThreads() {
    const ThreadKnobs& knobs = thread_knobs();
    if (set_mkl_) knobs.mkl_set_num_threads_local(saved_mkl_);
    if (saved_omp_ > 0) knobs.omp_set_num_threads(saved_omp_);
  }
  GemmThreads(const GemmThreads&) = delete;
  GemmThreads& operator=(const GemmThreads&) = delete;

 private:
  int saved_omp_ = 0, saved_mkl_ = 0;
  bool set_mkl_ = false;
};

// at::mm / at::mm_out / at::addmm_out / Tensor::addmm_, each under GemmThreads (named
// apart from at::'s, which argument-dependent lookup would also find).
inline at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  GemmThreads threads(a, a.size(0), b.size(1), a.size(1));
  return at::mm(a, b);
}

inline void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  GemmThreads threads(a, a.size(0), b.size(1), a.size(1));
  at::mm_out(const_cast<at::Tensor&>(out), a, b);
}

inline void gemm_bias_out(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  GemmThreads threads(a, a.size(0), b.size(1), a.size(1));
  at::addmm_out(const_cast<at::Tensor&>(out), bias, a, b);
}

// c += a @ b
inline void gemm_add(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  GemmThreads threads(a, a.size(0), b.size(1), a.size(1));
  const_cast<at::Tensor&>(c).addmm_(a, b);
}

}  // namespace rlk::lm_head
