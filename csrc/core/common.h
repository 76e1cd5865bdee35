// Torch-free building blocks shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLK_HOST_DEVICE __host__ __device__
#else
#define RLK_HOST_DEVICE
#endif
#define RLK_INLINE RLK_HOST_DEVICE inline

// Declares a family's CUDA launcher beside its params struct, in CUDA builds
// only: cudaError_t cuda::name(const Params& p, cudaStream_t stream), defined
// in the family's .cu file, which picks the kernels' instance from p's dtype.
#if defined(__CUDACC__) || defined(RLK_WITH_CUDA)
#include <cuda_runtime_api.h>
#define RLK_CUDA_LAUNCHER(name, Params) \
  namespace cuda {                      \
  cudaError_t name(const Params& p, cudaStream_t stream); \
  }
#else
#define RLK_CUDA_LAUNCHER(name, Params)
#endif

namespace rlk {

// Accumulation type: reductions and recurrences run in float32 for every
// 16/32-bit input and stay in float64 for float64 input.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Element type of a tensor a params struct points at.  The struct carries it
// so that a kernel family's launcher can pick its template instance itself;
// half and bfloat16 are the 16-bit IEEE and brain float formats.
enum class Dtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

template <typename To, typename From>
RLK_INLINE To cast(From x) { return static_cast<To>(x); }

#if defined(__CUDACC__)
// torch's nvcc flags define __CUDA_NO_HALF_CONVERSIONS__, so the implicit
// conversions of __half and __nv_bfloat16 are unavailable: convert explicitly.
template <> RLK_INLINE float cast<float, __half>(__half x) { return __half2float(x); }
template <> RLK_INLINE float cast<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> RLK_INLINE __half cast<__half, float>(float x) { return __float2half_rn(x); }
template <> RLK_INLINE __nv_bfloat16 cast<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
#endif

}  // namespace rlk
