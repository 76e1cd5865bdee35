// Torch-free building blocks shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLK_HOST_DEVICE __host__ __device__
#else
#define RLK_HOST_DEVICE
#endif
#define RLK_INLINE RLK_HOST_DEVICE inline

namespace rlk {

// Accumulation type: reductions and recurrences run in float32 for every
// 16/32-bit input and stay in float64 for float64 input.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

template <typename To, typename From>
RLK_INLINE To cast(From x) { return static_cast<To>(x); }

}  // namespace rlk
