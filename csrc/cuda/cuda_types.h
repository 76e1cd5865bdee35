// Maps torch's 16-bit scalar types onto the CUDA runtime's, which share their
// bit layout, so torch-facing code can call the torch-free launchers.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlk {
namespace cuda {

template <typename T> struct device_type { using type = T; };
template <> struct device_type<c10::Half> { using type = __half; };
template <> struct device_type<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
const typename device_type<T>::type* dptr(const T* p) {
  return reinterpret_cast<const typename device_type<T>::type*>(p);
}

}  // namespace cuda
}  // namespace rlk
