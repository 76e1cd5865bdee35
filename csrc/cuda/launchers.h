// Launchers for the torch-free CUDA kernels: raw pointers and a stream.
// Every .cu file instantiates its launchers for float, double, __half and
// __nv_bfloat16; the *_torch.cpp files map at::Half/at::BFloat16 onto them.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "../core/rows.h"

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

// ---- logprobs family (logprobs.cu); T is float, __half or __nv_bfloat16 ------------------------
// Blocks that share one row of the forward pass (split-V for long rows and few of
// them); the forward needs 3 * N * splits floats of workspace when splits > 1.
int logprobs_splits(int64_t N, int64_t V, int sm_count);

template <typename T>
cudaError_t launch_logprobs_forward(const T* logits, RowIndex rows, int64_t N, int64_t V, const int64_t* labels,
                                    int64_t ignore_index, double temperature, bool with_entropy, float* logprobs,
                                    float* entropy, float* saved, float* workspace, int splits,
                                    cudaStream_t stream);

// grad may alias logits (in-place backward); grad_entropy and entropy may be null.
// logits may be a vocabulary tile starting at column vocab_start of the rows.
template <typename T>
cudaError_t launch_logprobs_backward(const T* logits, RowIndex rows, T* grad, RowIndex grad_rows, int64_t N,
                                     int64_t V, const int64_t* labels, int64_t ignore_index, int64_t vocab_start,
                                     const float* grad_logprobs, const float* grad_entropy, const float* entropy,
                                     const float* saved, double temperature, cudaStream_t stream);

// KL(pi || pi_ref): 5 * N * splits floats of workspace when splits > 1.
template <typename T>
cudaError_t launch_kl_forward(const T* logits, RowIndex rows, const T* ref, RowIndex ref_rows, int64_t N, int64_t V,
                              const bool* mask, double temperature, float* kl, float* saved, float* workspace,
                              int splits, cudaStream_t stream);

// grad_logits / grad_ref: dense [N, V] or null.
template <typename T>
cudaError_t launch_kl_backward(const T* logits, RowIndex rows, const T* ref, RowIndex ref_rows, int64_t N, int64_t V,
                               const bool* mask, const float* grad_kl, const float* saved, double temperature,
                               T* grad_logits, T* grad_ref, cudaStream_t stream);

// kl_penalty (kl_penalty.cu): in_t float, double, __half, __nv_bfloat16; out_t float or double.
template <typename in_t, typename out_t>
cudaError_t launch_kl_penalty(const in_t* logprobs, const in_t* ref_logprobs, int64_t n, int kind, double clamp,
                              out_t* value, out_t* slope, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk

namespace rlk {
namespace cuda {

template <typename in_t, typename out_t>
cudaError_t launch_group_advantages(const in_t* scores, const int64_t* group_index, int64_t N,
                                    int64_t group_size, int64_t num_groups, int baseline, int scale,
                                    double eps, out_t* advantages, bool* all_equal, cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_masked_row_mean(const in_t* x, const uint8_t* mask, int64_t R, int64_t C, out_t* out,
                                   cudaStream_t stream);

template <typename in_t, typename out_t>
cudaError_t launch_masked_whiten(const in_t* x, const uint8_t* mask, int64_t N, bool shift_mean, double eps,
                                 out_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlk
