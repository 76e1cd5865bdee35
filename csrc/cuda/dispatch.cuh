// How a launcher picks its kernels' template instance from a params struct's
// Dtype, and reports the launch: one place instead of an instantiation list
// and an error epilogue in every .cu file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "../core/common.h"

namespace rlk {
namespace cuda {

// f(tag)'s own status when it returns one, else the launch status.
template <class F, class T>
cudaError_t launch_status(F& f, T tag) {
  if constexpr (std::is_void<decltype(f(tag))>::value) {
    f(tag);
    return cudaGetLastError();
  } else {
    return f(tag);
  }
}

// Calls f(T{}) with T the CUDA type of `dtype`: float, double, __half or
// __nv_bfloat16 (the kernels then accumulate in acc_t<T>).
template <class F>
cudaError_t launch_typed(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: return launch_status(f, float{});
    case Dtype::f64: return launch_status(f, double{});
    case Dtype::f16: return launch_status(f, __half{});
    case Dtype::bf16: return launch_status(f, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The same for logits, which come in float, __half or __nv_bfloat16 only.
template <class F>
cudaError_t launch_logits_typed(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: return launch_status(f, float{});
    case Dtype::f16: return launch_status(f, __half{});
    case Dtype::bf16: return launch_status(f, __nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace rlk
