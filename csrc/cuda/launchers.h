// Launchers for the torch-free CUDA kernels: raw pointers and a stream.
// Every .cu file instantiates its launchers for float, double, __half and
// __nv_bfloat16; the *_torch.cpp files map at::Half/at::BFloat16 onto them.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace rlk {
namespace cuda {

template <typename in_t, typename out_t>
cudaError_t launch_gae(const in_t* rewards, const in_t* values, const uint8_t* mask,
                       const uint8_t* dones, const out_t* last_values, int64_t B, int64_t T,
                       double gamma, double lam, out_t* advantages, out_t* returns,
                       cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_discounted_returns(const in_t* rewards, const uint8_t* mask, const uint8_t* dones,
                                      int64_t B, int64_t T, double gamma, out_t* returns,
                                      cudaStream_t stream);

// Parameter averaging: many tensors <-> one flat bucket (scale and cast
// fused), and out = w_self * x + w_left * left + w_right * right.  Host
// arrays of device pointers; any count of tensors.
template <typename src_t, typename dst_t>
cudaError_t launch_pack_tensors(const src_t* const* tensors, const int64_t* numels, int64_t count,
                                dst_t* bucket, double scale, cudaStream_t stream);

template <typename src_t, typename dst_t>
cudaError_t launch_unpack_tensors(const src_t* bucket, dst_t* const* tensors, const int64_t* numels,
                                  int64_t count, double scale, cudaStream_t stream);

template <typename T>
cudaError_t launch_gossip_mix(const T* x, const T* left, const T* right, int64_t n, double w_self,
                              double w_left, double w_right, T* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk
